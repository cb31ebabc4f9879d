//! Config errors in words for people, with the line of the key: TOML syntax
//! errors, values that do not fit the schema (unknown key, wrong type), and
//! where a dotted key (`jobs.slots_per_core`, `mounts.mount[0].name`) is
//! written in the text.

/// A TOML syntax error in one line: the position, the text there and the
/// parser's message.
pub(super) fn syntax_message(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = line_of(text, span.start);
            let snippet = text[span.clone()].lines().next().unwrap_or("").trim();
            if snippet.is_empty() {
                format!("line {line}: {message}")
            } else {
                format!("line {line}, at `{snippet}`: {message}")
            }
        }
        None => message,
    }
}

/// A value that does not fit the schema (unknown key, wrong type) in one
/// line: the line, the dotted key and, in words for people, what is allowed.
pub(super) fn schema_message(
    error: &serde_path_to_error::Error<toml::de::Error>,
    text: &str,
) -> String {
    let inner = error.inner();
    let message = inner.message().trim().replace('\n', " ");
    let mut key = error.path().to_string();
    let problem = if let Some(rest) = message.strip_prefix("unknown field `") {
        // serde: "unknown field `x`, expected one of `a`, `b`" (or
        // "expected `a`", or "there are no fields"). The path names the
        // unknown key itself; should it stop at the table, the key is added.
        let (field, allowed) = rest.split_once('`').unwrap_or((rest, ""));
        if key == "." {
            key = field.to_owned();
        } else if key.rsplit('.').next() != Some(field) {
            key = format!("{key}.{field}");
        }
        let allowed = allowed
            .trim_start_matches(',')
            .trim()
            .replace("expected one of ", "")
            .replace("expected ", "");
        if allowed.is_empty() || allowed.contains("no fields") {
            "unknown key: this table has no keys".to_owned()
        } else {
            format!("unknown key; allowed: {}", allowed.replace('`', ""))
        }
    } else if let Some(rest) = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
    {
        // serde: "invalid type: string \"two\", expected u32".
        match rest.rsplit_once(", expected ") {
            Some((found, expected)) => {
                format!("expected {}, found {found}", expected_in_words(expected))
            }
            None => rest.to_owned(),
        }
    } else {
        message
    };
    let line = inner
        .span()
        .map(|span| line_of(text, span.start))
        .or_else(|| key_line(text, &key));
    match line {
        Some(line) => format!("line {line}: key `{key}`: {problem}"),
        None => format!("key `{key}`: {problem}"),
    }
}

/// serde's name for an expected type (a Rust type) in words.
fn expected_in_words(expected: &str) -> String {
    match expected {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a boolean" | "bool" => "true or false".to_owned(),
        "path string" | "a string" => "a string".to_owned(),
        "a sequence" => "a list ([...])".to_owned(),
        "a map" => "a table".to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other if other.starts_with("a sequence") => "a list ([...])".to_owned(),
        other => other.to_owned(),
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where a dotted key (`jobs.slots_per_core`,
/// `mounts.mount[0].name`) is written, when it is in the text.
pub(super) fn key_line(text: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let document = DeTable::parse(text).ok()?;
    let mut table = document.get_ref();
    let mut segments = key.split('.').peekable();
    while let Some(segment) = segments.next() {
        let (name, index) = match segment.split_once('[') {
            Some((name, index)) => (name, index.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let (found_key, value) = table.iter().find(|(k, _)| k.get_ref() == name)?;
        let value = match (index, value.get_ref()) {
            (Some(i), DeValue::Array(items)) => items.get(i)?,
            (Some(_), _) => return None,
            (None, _) => value,
        };
        match value.get_ref() {
            DeValue::Table(inner) if segments.peek().is_some() => table = inner,
            _ if segments.peek().is_some() => return None,
            // The key's own position; a table header has no span of its own
            // key when the table was opened implicitly, so fall back to it.
            _ => return Some(line_of(text, found_key.span().start)),
        }
    }
    None
}
