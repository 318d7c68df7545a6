//! qemu-io's number and time formatting: human sizes ("64 KiB",
//! "1.500 KiB", "481.490541 bytes"), the statistics lines printed after
//! each request, and the `-v` hex dump.

use std::fmt::Write as _;
use std::time::Duration;

/// A byte count as qemu-io prints it: three decimals in the largest binary
/// unit that fits ("1.500 KiB"), six for plain bytes, and a fraction of
/// all zeros dropped ("64 KiB", "0 bytes").
pub fn human_size(value: f64) -> String {
    const UNITS: [(u32, &str); 6] =
        [(60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB")];
    let mut text = None;
    for (shift, suffix) in UNITS {
        let unit = (1u64 << shift) as f64;
        if value >= unit {
            text = Some((format!("{:.3}", value / unit), suffix));
            break;
        }
    }
    let (mut s, suffix) = text.unwrap_or_else(|| (format!("{value:.6}"), " bytes"));
    if let Some(at) = s.find(".000") {
        s.truncate(at);
    }
    s.push_str(suffix);
    s
}

/// Elapsed time as qemu-io prints it: "00.01 sec" below a second,
/// "H:MM:SS.ss" from one second on (and always in `-C` output).
pub fn time_str(t: Duration, always_long: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if always_long || secs > 0 {
        format!("{}:{:02}:{:05.2}", secs / 3600, (secs / 60) % 60, (secs % 60) as f64 + frac)
    } else {
        format!("{frac:05.2} sec")
    }
}

/// The two statistics lines after a request ("wrote 512/512 bytes at
/// offset 0" and the rate line), or the one `-C` line.
pub fn report(op: &str, t: Duration, offset: u64, count: u64, total: u64, ops: u32, machine: bool) -> String {
    let secs = t.as_secs_f64();
    let (rate, ops_rate) = (total as f64 / secs, f64::from(ops) / secs);
    if machine {
        format!("{total},{ops},{},{rate:.3},{ops_rate:.3}\n", time_str(t, true))
    } else {
        format!(
            "{op} {total}/{count} bytes at offset {offset}\n{}, {ops} ops; {} ({}/sec and {ops_rate:.4} ops/sec)\n",
            human_size(total as f64),
            time_str(t, false),
            human_size(rate)
        )
    }
}

/// The `-v` dump: 16 bytes a line, hex then the alphanumeric characters.
pub fn dump(buf: &[u8], offset: u64) -> String {
    let mut out = String::with_capacity(buf.len() * 5);
    for (i, line) in buf.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}:  ", offset + i as u64 * 16);
        for b in line {
            let _ = write!(out, "{b:02x} ");
        }
        out.push(' ');
        for &b in line {
            out.push(if b.is_ascii_alphanumeric() { b as char } else { '.' });
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(65536.0), "64 KiB");
        assert_eq!(human_size(1536.0), "1.500 KiB");
        assert_eq!(human_size(512.0), "512 bytes");
        assert_eq!(human_size(1.0), "1 bytes");
        assert_eq!(human_size(0.0), "0 bytes");
        assert_eq!(human_size(75.656786), "75.656786 bytes");
        assert_eq!(human_size(1049088.0), "1 MiB");
        assert_eq!(human_size((1u64 << 30) as f64), "1 GiB");
        assert_eq!(human_size(f64::INFINITY), "inf EiB");
    }

    #[test]
    fn times() {
        assert_eq!(time_str(Duration::from_millis(10), false), "00.01 sec");
        assert_eq!(time_str(Duration::from_millis(0), true), "0:00:00.00");
        assert_eq!(time_str(Duration::from_millis(5_683_510), false), "1:34:43.51");
    }

    #[test]
    fn dumps() {
        assert_eq!(dump(&[0xcd, b'a'], 0x10), "00000010:  cd 61  .a\n");
    }
}
