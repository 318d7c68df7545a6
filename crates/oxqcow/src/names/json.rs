//! QEMU's JSON dialect (`qobject/json-lexer.c`, `json-parser.c`) as far as
//! `json:` pseudo-filenames use it: RFC 8259 JSON plus single-quoted
//! strings (`{'driver': 'qcow2'}`), and the flattening QEMU applies to the
//! result (`qdict_flatten`: `{"file": {"filename": "x"}}` is `file.filename=x`,
//! list members are numbered: `a.0`, `a.1`).
//!
//! The input comes from whoever typed (or wrote into an image header) the
//! name, so nesting is bounded as QEMU bounds it and nothing is allocated
//! beyond the size of the input.

/// QEMU's `MAX_NESTING`: deeper input is refused, never recursed into.
const MAX_NESTING: usize = 1024;

/// A parsed JSON value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    /// A number as written (QEMU keeps it as a QNum; QemuOpts reads it back
    /// as text).
    Number(String),
    String(String),
    Array(Vec<Value>),
    /// Members in the order written.
    Object(Vec<(String, Value)>),
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

/// Why the text is not JSON, worded as QEMU's parser words it.
fn error(what: &str) -> String {
    format!("JSON parse error, {what}")
}

fn premature_end() -> String {
    error("premature EOI")
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.text.get(self.pos).is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.text.get(self.pos).copied()
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_NESTING {
            return Err(error("too deeply nested"));
        }
        match self.peek() {
            None => Err(premature_end()),
            Some(b'{') => {
                self.pos += 1;
                self.object(depth)
            }
            Some(b'[') => {
                self.pos += 1;
                self.array(depth)
            }
            Some(q @ (b'"' | b'\'')) => {
                self.pos += 1;
                self.string(q).map(Value::String)
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b) if b.is_ascii_alphabetic() => self.keyword(),
            Some(_) => Err(error("expecting value")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Value, String> {
        let mut members: Vec<(String, Value)> = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Object(members));
        }
        loop {
            let key = match self.peek() {
                None => return Err(premature_end()),
                Some(q @ (b'"' | b'\'')) => {
                    self.pos += 1;
                    self.string(q)?
                }
                Some(_) => return Err(error("key is not a string in object")),
            };
            match self.peek() {
                None => return Err(premature_end()),
                Some(b':') => self.pos += 1,
                Some(_) => return Err(error("missing : in object pair")),
            }
            let value = self.value(depth + 1)?;
            if members.iter().any(|(k, _)| *k == key) {
                return Err(error(&format!("duplicate key '{key}'")));
            }
            members.push((key, value));
            match self.peek() {
                None => return Err(premature_end()),
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Object(members));
                }
                Some(_) => return Err(error("expected separator in dict")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Value, String> {
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(Value::Array(items));
        }
        loop {
            items.push(self.value(depth + 1)?);
            match self.peek() {
                None => return Err(premature_end()),
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Value::Array(items));
                }
                Some(_) => return Err(error("expected separator in list")),
            }
        }
    }

    /// The rest of a string opened by `quote`, escapes decoded.
    fn string(&mut self, quote: u8) -> Result<String, String> {
        let mut out: Vec<u8> = Vec::new();
        loop {
            let Some(&b) = self.text.get(self.pos) else { return Err(premature_end()) };
            self.pos += 1;
            match b {
                _ if b == quote => break,
                b'\\' => {
                    let Some(&e) = self.text.get(self.pos) else { return Err(premature_end()) };
                    self.pos += 1;
                    let c = match e {
                        b'"' | b'\'' | b'\\' | b'/' => e as char,
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(error("invalid escape sequence in string")),
                    };
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
                0..=0x1f => return Err(error("control character in string")),
                _ => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|_| error("invalid UTF-8 sequence in string"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self.text.get(self.pos..self.pos + 4).ok_or_else(premature_end)?;
        let s = std::str::from_utf8(digits).map_err(|_| error("invalid hex escape sequence in string"))?;
        let v = u32::from_str_radix(s, 16).map_err(|_| error("invalid hex escape sequence in string"))?;
        self.pos += 4;
        Ok(v)
    }

    /// `\uXXXX`, with surrogate pairs; a lone surrogate is an error.
    fn unicode_escape(&mut self) -> Result<char, String> {
        let first = self.hex4()?;
        let code = if (0xd800..0xdc00).contains(&first) {
            if self.text.get(self.pos..self.pos + 2) != Some(b"\\u") {
                return Err(error("missing second half of surrogate pair"));
            }
            self.pos += 2;
            let second = self.hex4()?;
            if !(0xdc00..0xe000).contains(&second) {
                return Err(error("invalid second half of surrogate pair"));
            }
            0x10000 + ((first - 0xd800) << 10) + (second - 0xdc00)
        } else {
            first
        };
        char::from_u32(code).filter(|&c| c != '\0').ok_or_else(|| error("invalid \\u escape in string"))
    }

    fn number(&mut self) -> Result<Value, String> {
        let start = self.pos;
        let digits = |p: &mut Parser| {
            let from = p.pos;
            while p.text.get(p.pos).is_some_and(u8::is_ascii_digit) {
                p.pos += 1;
            }
            p.pos - from
        };
        if self.text.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        if digits(self) == 0 {
            return Err(error("invalid number"));
        }
        if self.text.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if digits(self) == 0 {
                return Err(error("invalid number"));
            }
        }
        if self.text.get(self.pos).is_some_and(|&b| b == b'e' || b == b'E') {
            self.pos += 1;
            if self.text.get(self.pos).is_some_and(|&b| b == b'+' || b == b'-') {
                self.pos += 1;
            }
            if digits(self) == 0 {
                return Err(error("invalid number"));
            }
        }
        let text = std::str::from_utf8(&self.text[start..self.pos]).map_err(|_| error("invalid number"))?;
        Ok(Value::Number(text.to_string()))
    }

    fn keyword(&mut self) -> Result<Value, String> {
        let start = self.pos;
        while self.text.get(self.pos).is_some_and(u8::is_ascii_alphanumeric) {
            self.pos += 1;
        }
        match &self.text[start..self.pos] {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            other => Err(error(&format!("invalid keyword '{}'", String::from_utf8_lossy(other)))),
        }
    }
}

/// Parses one JSON value filling all of `text` (surrounding white space allowed).
pub(crate) fn parse(text: &str) -> Result<Value, String> {
    let mut p = Parser { text: text.as_bytes(), pos: 0 };
    let v = p.value(0)?;
    if p.peek().is_some() {
        return Err(error("expecting end of input"));
    }
    Ok(v)
}

/// The members of an object as QEMU's `qdict_flatten` leaves them, each
/// value as QemuOpts reads it (strings as they are, numbers as written,
/// booleans as `on`/`off`). A `null`, which no option takes, is refused.
pub(crate) fn flatten(members: &[(String, Value)]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (k, v) in members {
        flatten_into(k, v, &mut out)?;
    }
    Ok(out)
}

fn flatten_into(key: &str, v: &Value, out: &mut Vec<(String, String)>) -> Result<(), String> {
    match v {
        Value::Null => return Err(format!("Invalid parameter type for '{key}', expected: string")),
        Value::Bool(b) => out.push((key.to_string(), if *b { "on" } else { "off" }.to_string())),
        Value::Number(n) => out.push((key.to_string(), n.clone())),
        Value::String(s) => out.push((key.to_string(), s.clone())),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten_into(&format!("{key}.{i}"), item, out)?;
            }
        }
        Value::Object(members) => {
            for (k, item) in members {
                flatten_into(&format!("{key}.{k}"), item, out)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_quotes_nesting_and_flattening() {
        let v = parse("{'driver': 'qcow2', \"file\": {'filename': 'a\\'b', 'x': [1, true]}, 'n': -1.5e3}").unwrap();
        let Value::Object(m) = v else { panic!("not an object") };
        assert_eq!(
            flatten(&m).unwrap(),
            [
                ("driver".into(), "qcow2".into()),
                ("file.filename".into(), "a'b".into()),
                ("file.x.0".into(), "1".into()),
                ("file.x.1".into(), "on".into()),
                ("n".into(), "-1.5e3".into()),
            ]
        );
    }

    #[test]
    fn errors_are_qemus() {
        assert_eq!(parse("{").unwrap_err(), "JSON parse error, premature EOI");
        assert_eq!(parse("{\"a\" 1}").unwrap_err(), "JSON parse error, missing : in object pair");
        assert_eq!(parse("{1: 2}").unwrap_err(), "JSON parse error, key is not a string in object");
        assert!(parse("[1,]").is_err());
        assert!(parse("\"\\u0000\"").is_err());
        assert!(parse("{} x").is_err());
        assert_eq!(parse("\"\\ud83d\\ude00\"").unwrap(), Value::String("😀".into()));
    }

    #[test]
    fn nesting_is_bounded() {
        // A hostile name must not overflow the stack.
        let deep = "[".repeat(100_000);
        assert_eq!(parse(&deep).unwrap_err(), "JSON parse error, too deeply nested");
        let ok = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn null_is_no_option_value() {
        let Value::Object(m) = parse("{\"a\": null}").unwrap() else { panic!() };
        assert!(flatten(&m).is_err());
    }
}
