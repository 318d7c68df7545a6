//! Output formats: `--output human|json`, qemu-img's JSON printing, and
//! sizes as QEMU's `size_to_str` writes them.

/// `--output` formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    /// Text for people.
    Human,
    /// qemu-img's JSON.
    Json,
}

impl OutputFormat {
    /// Parses an `--output` value, with qemu-img's message on failure.
    pub fn parse(value: &str) -> Result<OutputFormat, String> {
        match value {
            "human" => Ok(OutputFormat::Human),
            "json" => Ok(OutputFormat::Json),
            other => Err(format!("--output expects 'human' or 'json' not '{other}'")),
        }
    }
}

/// Prints a JSON value the way qemu-img does, followed by a newline.
pub fn print_json(v: &serde_json::Value) {
    println!("{}", crate::app::qjson::to_string(v));
}

/// A size as QEMU's `size_to_str` writes it: three significant digits and a
/// binary unit, switching to the next unit from 1000 of the current one
/// ("0 B", "196 KiB", "1.5 MiB", "1 GiB").
pub fn size_to_str(bytes: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let scaled = bytes as f64 / (1000.0 / 1024.0);
    // frexp's exponent: scaled = m * 2^e with m in [0.5, 1).
    let e = if scaled == 0.0 { 0 } else { ((scaled.to_bits() >> 52) & 0x7ff) as i64 - 1022 };
    // C division truncates towards zero.
    let i = ((e - 1) / 10).clamp(0, SUFFIXES.len() as i64 - 1) as usize;
    let value = bytes as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", format_g3(value), SUFFIXES[i])
}

/// printf's `%.3g`.
fn format_g3(v: f64) -> String {
    const PRECISION: i32 = 3;
    if v == 0.0 {
        return "0".to_string();
    }
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, v);
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: String| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if !(-4..PRECISION).contains(&exp) {
        let m = trim(mantissa.to_string());
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{m}e{sign}{:02}", exp.abs())
    } else {
        trim(format!("{:.*}", (PRECISION - 1 - exp) as usize, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_prints_them() {
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(200_704), "196 KiB");
        assert_eq!(size_to_str(197_120), "192 KiB");
        assert_eq!(size_to_str(1 << 30), "1 GiB");
        assert_eq!(size_to_str(3 << 19), "1.5 MiB");
        assert_eq!(size_to_str(1_331_200), "1.27 MiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1023 * 1024), "0.999 MiB");
    }
}
