#!/usr/bin/env bash
# Builds the Debian package of rimg and its daemons (cargo-deb): the
# binaries, manual pages and shell completions made from their clap
# definitions, and the systemd units of contrib/systemd.
#
# Usage: scripts/deb.sh [PROFILE [CARGO_DEB_OPTION...]]
#   PROFILE  release by default; the tests use dev (and --fast)
# Prints the path of the .deb it wrote (under target/debian/).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-release}
shift || true
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
target=${CARGO_TARGET_DIR:-target}
case $profile in
  dev) dir=debug ;;
  *) dir=$profile ;;
esac
bins=(rimg rimg-vhost-blk rimg-vhost-net rimg-nbd rimg-vmm)
pkgs=()
for b in "${bins[@]}"; do pkgs+=(-p "$b"); done
cargo build --quiet --profile "$profile" --bins "${pkgs[@]}"

# The package's own files, made by the binaries just built.
assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
rimg=$target/$dir/rimg
"$rimg" man > "$assets/man/rimg.1"
"$rimg" --help | sed -n '/^Commands:/,/^$/p' | awk 'NR > 1 && NF && $1 != "help" { print $1 }' |
  while read -r sub; do
    "$rimg" man "$sub" > "$assets/man/rimg-$sub.1"
  done
for b in rimg-vhost-blk rimg-vhost-net rimg-nbd rimg-vmm; do
  "$target/$dir/$b" --man > "$assets/man/$b.1"
done
gzip -9n "$assets"/man/*.1
"$rimg" completions bash > "$assets/completions/rimg.bash"
"$rimg" completions zsh > "$assets/completions/_rimg"
"$rimg" completions fish > "$assets/completions/rimg.fish"

cargo deb --quiet -p rimg --no-build --profile "$profile" --strip "$@"
