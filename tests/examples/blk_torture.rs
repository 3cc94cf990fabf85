//! One torture run of rimg-vhost-blk (see `rimg_tests::torture`), for
//! `scripts/soak.sh` and for replaying a failure.
//!
//! `blk_torture --seed N [--config 'q=2,qd=16,...'] [--ms PHASE_MS]`
//!
//! Without --config the configuration is drawn from the seed. Prints one
//! line `seed=N config=... requests=N result=ok|FAIL kinds=...`, then the
//! full report when the run failed; exits 1 on failure, 2 on bad usage.

use rimg_tests::torture::{self, Config};

fn main() {
    let mut seed = None;
    let mut config = None;
    let mut ms = 3000u64;
    let mut a = std::env::args().skip(1);
    let usage = || -> ! {
        eprintln!("usage: blk_torture --seed N [--config STR] [--ms PHASE_MS]");
        std::process::exit(2)
    };
    while let Some(k) = a.next() {
        let v = a.next().unwrap_or_else(|| usage());
        match k.as_str() {
            "--seed" => seed = Some(v.parse::<u64>().unwrap_or_else(|_| usage())),
            "--config" => config = Some(v),
            "--ms" => ms = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let seed = seed.unwrap_or_else(|| usage());
    let cfg = match config {
        Some(s) => Config::parse(&s).unwrap_or_else(|e| {
            eprintln!("blk_torture: {e}");
            std::process::exit(2)
        }),
        None => Config::random(seed, ms),
    };
    let o = torture::run(seed, &cfg);
    let mut kinds: Vec<&str> = o.failures.iter().map(|f| f.kind()).collect();
    kinds.dedup();
    println!(
        "seed={seed} config={cfg} requests={} result={} kinds={} secs={:.1}",
        o.requests,
        if o.ok() { "ok" } else { "FAIL" },
        if kinds.is_empty() {
            "-".to_string()
        } else {
            kinds.join("+")
        },
        o.elapsed.as_secs_f64()
    );
    if !o.ok() {
        println!("{}", o.report());
        std::process::exit(1);
    }
}
