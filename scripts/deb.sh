#!/usr/bin/env bash
# Builds the Debian package of rimg and its daemons (cargo-deb): the
# binaries, manual pages and shell completions made from their clap
# definitions, and the systemd units of contrib/systemd.
#
# Usage: scripts/deb.sh [PROFILE [CARGO_DEB_OPTION...]]
#   PROFILE  release by default; the tests use dev (and --fast)
# Prints the path of the .deb it wrote (under the target directory's
# debian/).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
shift || true
# The version whose asset mapping (target/release/ to the profile's
# directory), --fast and output this script relies on.
if [ "$(cargo deb --version 2>/dev/null)" != "cargo-deb 3.8.0" ]; then
  cargo install cargo-deb --version 3.8.0 --locked
fi
# Wherever cargo puts its builds (CARGO_TARGET_DIR, build.target-dir).
target=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
case $profile in
  dev) dir=debug ;;
  *) dir=$profile ;;
esac
bins=(rimg rimg-vhost-blk rimg-vhost-net rimg-nbd rimg-vmm)
# RIMG_DEB_NO_BUILD=1: package the binaries already built (the tests
# build them as their suite does).
if [ "${RIMG_DEB_NO_BUILD:-0}" != 1 ]; then
  pkgs=()
  for b in "${bins[@]}"; do pkgs+=(-p "$b"); done
  cargo build --quiet --profile "$profile" --bins "${pkgs[@]}"
fi

# The package's own files, made by the binaries being packaged; where
# img-cli/Cargo.toml's assets name them.
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
rimg=$target/$dir/rimg
"$rimg" man > "$assets/man/rimg.1"
NO_COLOR=1 "$rimg" --help | sed -n '/^Commands:/,/^$/p' |
  awk 'NR > 1 && NF && $1 != "help" { print $1 }' |
  while read -r sub; do
    "$rimg" man "$sub" > "$assets/man/rimg-$sub.1"
  done
pages=$(find "$assets/man" -name 'rimg-*.1' | wc -l)
if [ "$pages" -lt 10 ]; then
  echo "only $pages subcommand pages: is 'rimg --help' as expected?" >&2
  exit 1
fi
for b in rimg-vhost-blk rimg-vhost-net rimg-nbd rimg-vmm; do
  "$target/$dir/$b" --man > "$assets/man/$b.1"
done
gzip -9n "$assets"/man/*.1
"$rimg" completions bash > "$assets/completions/rimg.bash"
"$rimg" completions zsh > "$assets/completions/_rimg"
"$rimg" completions fish > "$assets/completions/rimg.fish"

cargo deb --quiet -p rimg --no-build --profile "$profile" --strip "$@"
