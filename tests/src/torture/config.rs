//! A torture run's configuration: chosen from a seed, printed and parsed
//! as one `key=value,...` string so that any run can be replayed exactly.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the queues do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Reads, writes (aligned, unaligned, multi-segment, 512 B to 1 MiB),
    /// flushes, discards and write-zeroes over a hot set and a wide range.
    Full,
    /// 4 KiB random writes only (bug (a)'s reproduction), read back at the
    /// end of each phase.
    Writes4k,
}

/// How the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Load stops, everything completes, the client disconnects, SIGTERM.
    Quiet,
    /// SIGTERM while requests are in flight.
    UnderLoad,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub queues: usize,
    pub qd: usize,
    pub size_mib: u64,
    /// The wide random range: [0, span).
    pub span_mib: u64,
    /// "raw" or "qcow2".
    pub fmt: String,
    pub cluster: u64,
    /// "off", "metadata" or "falloc".
    pub prealloc: String,
    pub lazy: bool,
    /// Serve an overlay over base <- mid (compressed and zero clusters).
    pub backing: bool,
    pub direct: bool,
    pub mix: Mix,
    /// Load time of each phase, in milliseconds.
    pub phase_ms: u64,
    /// Disconnects and reconnects between phases (phases = 1 + this).
    pub reconnects: u32,
    pub end: End,
    /// Each request's deadline, in milliseconds.
    pub deadline_ms: u64,
    /// Submit QD requests together and wait for all of them before the
    /// next batch (instead of refilling each slot as it completes).
    pub batch: bool,
    /// qcow2 with extended L2 entries (subclusters; clusters of 16 KiB
    /// and up).
    pub extl2: bool,
    /// qcow2 guest data in an external data file: "off", "on", or "raw"
    /// (data_file_raw=on: the data file is the disk as a raw image).
    pub data: String,
    /// The daemon's `--poll-us` (0: no polling).
    pub poll_us: u32,
}

impl Config {
    /// Bug (a)'s reproduction: 2 queues, QD16, 4 KiB random writes over
    /// 64 MiB of a fresh 512 MiB qcow2 with 64 KiB clusters.
    pub fn bug_a(phase_ms: u64) -> Config {
        Config {
            queues: 2,
            qd: 16,
            size_mib: 512,
            span_mib: 64,
            fmt: "qcow2".into(),
            cluster: 65536,
            prealloc: "off".into(),
            lazy: false,
            backing: false,
            direct: false,
            mix: Mix::Writes4k,
            phase_ms,
            reconnects: 0,
            end: End::Quiet,
            deadline_ms: 10_000,
            batch: false,
            extl2: false,
            data: "off".into(),
            poll_us: 0,
        }
    }

    /// A configuration drawn from `seed`; `phase_ms` sets the load time.
    pub fn random(seed: u64, phase_ms: u64) -> Config {
        let mut r = StdRng::seed_from_u64(seed ^ 0x636f_6e66);
        let queues = [1, 2, 4][r.random_range(0..3)];
        let qd = [1, 2, 4, 8, 16, 32, 64, r.random_range(1..=64)][r.random_range(0..8)];
        let raw = r.random_bool(0.2);
        let cluster = [512, 4096, 65536, 65536, 2 << 20][r.random_range(0..5)];
        let backing = !raw && r.random_bool(0.35);
        let prealloc = if raw || backing {
            "off"
        } else {
            ["off", "off", "metadata", "falloc"][r.random_range(0..4)]
        };
        // Small clusters mean much metadata: keep those disks small.
        let size_mib = match cluster {
            512 => 32,
            4096 => 128,
            _ => [64, 256, 512][r.random_range(0..3)],
        };
        let mut c = Config {
            queues,
            qd,
            size_mib,
            span_mib: size_mib,
            fmt: if raw { "raw" } else { "qcow2" }.into(),
            cluster: if raw { 65536 } else { cluster },
            prealloc: prealloc.into(),
            lazy: !raw && r.random_bool(0.3),
            backing,
            direct: r.random_bool(0.3),
            mix: if r.random_bool(0.1) {
                Mix::Writes4k
            } else {
                Mix::Full
            },
            phase_ms,
            reconnects: r.random_range(0..=2),
            end: if r.random_bool(0.3) {
                End::UnderLoad
            } else {
                End::Quiet
            },
            deadline_ms: 10_000,
            batch: r.random_bool(0.25),
            extl2: false,
            data: "off".into(),
            poll_us: 0,
        };
        // Drawn last, so that the draws above (and the CI cases pinned
        // from them) stay what they were before these existed.
        c.extl2 = c.is_qcow2() && c.cluster >= 16384 && r.random_bool(0.25);
        if c.is_qcow2() && c.prealloc == "off" && r.random_bool(0.2) {
            c.data = if c.backing || r.random_bool(0.5) {
                "on"
            } else {
                "raw"
            }
            .into();
        }
        if r.random_bool(0.2) {
            c.poll_us = [20, 500][r.random_range(0..2)];
        }
        c
    }

    pub fn is_qcow2(&self) -> bool {
        self.fmt == "qcow2"
    }

    /// Guest data in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.data != "off"
    }

    pub fn parse(s: &str) -> Result<Config, String> {
        let mut c = Config::bug_a(1000);
        for kv in s.split(',').filter(|x| !x.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("'{kv}': expected key=value"))?;
            let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{k}={v}: {e}"));
            let flag = |v: &str| match v {
                "0" => Ok(false),
                "1" => Ok(true),
                _ => Err(format!("{k}={v}: expected 0 or 1")),
            };
            match k {
                "q" => c.queues = num(v)? as usize,
                "qd" => c.qd = num(v)? as usize,
                "size" => c.size_mib = num(v)?,
                "span" => c.span_mib = num(v)?,
                "fmt" if v == "raw" || v == "qcow2" => c.fmt = v.into(),
                "cs" => c.cluster = num(v)?,
                "pre" if ["off", "metadata", "falloc"].contains(&v) => c.prealloc = v.into(),
                "lazy" => c.lazy = flag(v)?,
                "back" => c.backing = flag(v)?,
                "direct" => c.direct = flag(v)?,
                "mix" => {
                    c.mix = match v {
                        "full" => Mix::Full,
                        "w4k" => Mix::Writes4k,
                        _ => return Err(format!("mix={v}: expected full or w4k")),
                    }
                }
                "ms" => c.phase_ms = num(v)?,
                "reconnects" => c.reconnects = num(v)? as u32,
                "end" => {
                    c.end = match v {
                        "quiet" => End::Quiet,
                        "load" => End::UnderLoad,
                        _ => return Err(format!("end={v}: expected quiet or load")),
                    }
                }
                "deadline" => c.deadline_ms = num(v)?,
                "batch" => c.batch = flag(v)?,
                "extl2" => c.extl2 = flag(v)?,
                "data" if ["off", "on", "raw"].contains(&v) => c.data = v.into(),
                "poll" => c.poll_us = num(v)? as u32,
                _ => return Err(format!("unknown or invalid setting '{kv}'")),
            }
        }
        let ok = [1, 2, 4].contains(&c.queues)
            && (1..=64).contains(&c.qd)
            && c.cluster.is_power_of_two()
            && (512..=2 << 20).contains(&c.cluster)
            && c.span_mib >= 1
            && c.span_mib <= c.size_mib
            && !(c.backing && c.prealloc != "off")
            && (!c.extl2 || c.is_qcow2() && c.cluster >= 16384)
            && (!c.has_data_file() || c.is_qcow2() && c.prealloc == "off")
            && !(c.data == "raw" && c.backing);
        if !ok {
            return Err(format!("inconsistent configuration '{s}'"));
        }
        Ok(c)
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "q={},qd={},size={},span={},fmt={},cs={},pre={},lazy={},back={},direct={},\
             mix={},ms={},reconnects={},end={},deadline={},batch={},extl2={},data={},poll={}",
            self.queues,
            self.qd,
            self.size_mib,
            self.span_mib,
            self.fmt,
            self.cluster,
            self.prealloc,
            u8::from(self.lazy),
            u8::from(self.backing),
            u8::from(self.direct),
            match self.mix {
                Mix::Full => "full",
                Mix::Writes4k => "w4k",
            },
            self.phase_ms,
            self.reconnects,
            match self.end {
                End::Quiet => "quiet",
                End::UnderLoad => "load",
            },
            self.deadline_ms,
            u8::from(self.batch),
            u8::from(self.extl2),
            self.data,
            self.poll_us
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_parses_back() {
        for seed in 0..200 {
            let c = Config::random(seed, 1500);
            assert_eq!(Config::parse(&c.to_string()).unwrap(), c, "{c}");
        }
        assert!(Config::parse("q=3").is_err());
        assert!(Config::parse("back=1,pre=falloc").is_err());
        assert!(Config::parse("extl2=1,cs=4096").is_err());
        assert!(Config::parse("back=1,data=raw").is_err());
        assert!(Config::parse("fmt=raw,data=on").is_err());
    }
}
