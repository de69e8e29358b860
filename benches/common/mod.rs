//! Shared by the benchmarks: the bundle they apply, process CPU and memory readings.

#![allow(dead_code)]

use std::time::Duration;

use flotilla::bundle::Bundle;

/// The 5-script bundle PRODUCT.md §7 speaks of.
pub const SCRIPTS: [(&str, &str); 5] = [
    (
        "V1__users.sql",
        "CREATE TABLE users (id bigserial PRIMARY KEY, name text NOT NULL);",
    ),
    ("V2__email.sql", "ALTER TABLE users ADD COLUMN email text;"),
    (
        "V3__orders.sql",
        "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint REFERENCES users (id), total numeric);",
    ),
    (
        "V4__index.sql",
        "-- flotilla:allow require-concurrent-index-creation the bench's tenants are new and empty\nCREATE INDEX orders_user_idx ON orders (user_id);",
    ),
    (
        "V5__seed.sql",
        "INSERT INTO users (name, email) VALUES ('admin', 'admin@example.invalid');",
    ),
];

pub fn bundle() -> Bundle {
    Bundle::from_sources(&SCRIPTS, "bench").expect("valid bundle")
}

/// User + system CPU time of this process so far.
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after the comm.
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

/// (current, peak) resident set size in MiB.
pub fn rss_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (kb("VmRSS:") / 1024.0, kb("VmHWM:") / 1024.0)
}

/// The machine, for the record.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{} cores, {cpu}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}
