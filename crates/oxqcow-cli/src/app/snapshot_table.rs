//! qemu-img's snapshot table (`info`, `snapshot -l`): the header, one row
//! per snapshot, dates in the local time zone.

use crate::app::output::size_to_str;

/// The header of a snapshot table, as qemu-img prints it.
pub fn snapshot_header() -> String {
    format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
}

/// One snapshot line from a qemu `SnapshotInfo` JSON object (`id`, `name`,
/// `vm-state-size`, `date-sec`, `vm-clock-sec`, `vm-clock-nsec`, `icount`).
/// Dates are shown in the local time zone, as qemu-img shows them.
pub fn snapshot_line(sn: &serde_json::Value) -> String {
    let s = |k: &str| sn.get(k).and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
    let n = |k: &str| sn.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let icount = sn.get("icount").and_then(serde_json::Value::as_u64);
    snapshot_row(
        &s("id"),
        &s("name"),
        n("vm-state-size"),
        n("date-sec"),
        n("vm-clock-sec") * 1_000_000_000 + n("vm-clock-nsec"),
        icount,
    )
}

/// One line of qemu's `bdrv_snapshot_dump`: `%-7s %-16s %8s %19s %15s %10s`
/// (C pads by bytes, not characters), the instruction count "--" when not
/// recorded (-1).
pub fn snapshot_row(
    id: &str,
    name: &str,
    vm_state_size: u64,
    date_sec: u64,
    vm_clock_nsec: u64,
    icount: Option<u64>,
) -> String {
    let secs = vm_clock_nsec / 1_000_000_000;
    let clock = format!(
        "{:04}:{:02}:{:02}.{:03}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        (vm_clock_nsec / 1_000_000) % 1000
    );
    let icount = icount.filter(|&i| i != u64::MAX).map_or_else(|| "--".to_string(), |i| i.to_string());
    format!(
        "{} {} {} {} {} {}",
        pad_bytes(id, 7, true),
        pad_bytes(name, 16, true),
        pad_bytes(&size_to_str(vm_state_size), 8, false),
        pad_bytes(&local_date(date_sec), 19, false),
        pad_bytes(&clock, 15, false),
        pad_bytes(&icount, 10, false)
    )
}

/// printf's `%-Ns` / `%Ns`: padding counts bytes.
fn pad_bytes(s: &str, width: usize, left: bool) -> String {
    let pad = " ".repeat(width.saturating_sub(s.len()));
    if left {
        format!("{s}{pad}")
    } else {
        format!("{pad}{s}")
    }
}

/// `YYYY-MM-DD HH:MM:SS` for seconds since the epoch in the local time
/// zone (`TZ`, else /etc/localtime), as QEMU prints snapshot dates with
/// `localtime_r` (a date out of the calendar's range prints as its number
/// of seconds).
fn local_date(secs: u64) -> String {
    date_in(secs, &jiff::tz::TimeZone::system())
}

fn date_in(secs: u64, tz: &jiff::tz::TimeZone) -> String {
    match i64::try_from(secs).ok().and_then(|s| jiff::Timestamp::from_second(s).ok()) {
        Some(t) => t.to_zoned(tz.clone()).strftime("%Y-%m-%d %H:%M:%S").to_string(),
        None => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_a_time_zone() {
        let utc = jiff::tz::TimeZone::UTC;
        assert_eq!(date_in(0, &utc), "1970-01-01 00:00:00");
        assert_eq!(date_in(1_795_539_009, &utc), "2026-11-24 16:50:09");
        assert_eq!(date_in(951_782_400, &utc), "2000-02-29 00:00:00");
        let paris = jiff::tz::TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        assert_eq!(date_in(1_795_539_009, &paris), "2026-11-24 17:50:09");
    }

    // Guards against a blank ICOUNT column for snapshots that recorded no
    // instruction count (v2 entries, short extra data): QEMU prints "--".
    #[test]
    fn unrecorded_icount_is_dashes() {
        for icount in [None, Some(u64::MAX)] {
            assert!(snapshot_row("1", "a", 0, 0, 0, icount).ends_with("         --"), "{icount:?}");
        }
        assert!(snapshot_row("1", "a", 0, 0, 0, Some(0)).ends_with("          0"));
    }
}
