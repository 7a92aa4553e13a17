//! A minijinja environment configured the way transformers configures Jinja2
//! for chat templates: trim/lstrip blocks, loop controls, Python string
//! methods, `raise_exception`, `strftime_now`, Python-style printing and a
//! `tojson` that is `json.dumps(ensure_ascii=False)`.

use std::fmt;

use chrono::NaiveDateTime;
use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, Value, ValueKind, ValueOrKwargs};
use minijinja::{Environment, Error, ErrorKind, State};

use super::pyjson::{self, DumpOptions};

/// Bounds a single render: templates are user data, and an infinite loop or
/// a runaway output must end in an error, not a hang.
pub const DEFAULT_FUEL: u64 = 50_000_000;

/// Where `strftime_now` reads the time.
#[derive(Debug, Clone, Copy, Default)]
pub enum Clock {
    #[default]
    Local,
    Frozen(NaiveDateTime),
}

/// The payload of `raise_exception(message)`, carried as the error's source
/// so the message reaches the client unchanged.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// The message a template passed to `raise_exception`, if that is what failed.
/// Renders into a string that may not grow past `max_bytes`: fuel bounds
/// the steps a template takes, this bounds the memory one step can fill.
pub fn render_limited(
    template: &minijinja::Template<'_, '_>,
    ctx: impl Into<Value>,
    max_bytes: usize,
    what: &str,
) -> Result<String, super::PromptError> {
    let mut out = LimitedString { text: String::new(), max_bytes, overflowed: false };
    match template.render_captured_to(ctx, &mut out) {
        Ok(_) => Ok(out.text),
        Err(_) if out.overflowed => {
            Err(super::PromptError::Invalid(format!("{what} produced more than {max_bytes} bytes")))
        }
        Err(e) => Err(e.into()),
    }
}

struct LimitedString {
    text: String,
    max_bytes: usize,
    overflowed: bool,
}

impl std::io::Write for LimitedString {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.max_bytes {
            self.overflowed = true;
            return Err(std::io::Error::other("template output too large"));
        }
        self.text.push_str(&String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn raised_message(e: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return Some(r.0.clone());
        }
        source = s.source();
    }
    None
}

/// One line naming the failure and where it happened.
pub fn describe(e: &Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

pub fn environment(clock: Clock) -> Environment<'static> {
    let mut env = Environment::new();
    if let Ok(syntax) =
        SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).keep_trailing_newline(false).build()
    {
        env.set_syntax(syntax);
    }
    env.set_fuel(Some(DEFAULT_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(python_formatter);
    env.add_filter("tojson", tojson);
    env.add_filter("map", map_generator);
    env.add_filter("select", select_generator);
    env.add_filter("reject", reject_generator);
    env.add_filter("selectattr", selectattr_generator);
    env.add_filter("rejectattr", rejectattr_generator);
    env.add_filter("escape", markupsafe_escape);
    env.add_filter("e", markupsafe_escape);
    env.add_filter("indent", indent);
    env.add_test("none", |v: &Value| v.is_none() || is_py_none(v));
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", move |format: String| -> Result<String, Error> {
        let now = match clock {
            Clock::Local => chrono::Local::now().naive_local(),
            Clock::Frozen(t) => t,
        };
        strftime(&now, &format)
    });
    env
}

pub use super::pyjson::{is_py_none, py_none};

/// Jinja2's `map`, `select`, `reject`, `selectattr` and `rejectattr` are
/// generators: iterable once, not JSON-serializable, and empty for a falsy
/// input such as `None` (`if value: for item in value: ...`).
fn generator(
    state: &mut State,
    value: Value,
    run: impl FnOnce(&mut State, Value) -> Result<Vec<Value>, Error>,
) -> Result<Value, Error> {
    let items = if value.is_true() { run(state, value)? } else { Vec::new() };
    Ok(Value::make_one_shot_iterator(items.into_iter()))
}

fn map_generator(state: &mut State, value: Value, args: Rest<ValueOrKwargs>) -> Result<Value, Error> {
    generator(state, value, |state, value| minijinja::filters::map(state, value, args))
}

fn select_generator(
    state: &mut State,
    value: Value,
    test: Option<String>,
    args: Rest<ValueOrKwargs>,
) -> Result<Value, Error> {
    generator(state, value, |state, value| minijinja::filters::select(state, value, test.map(Into::into), args))
}

fn reject_generator(
    state: &mut State,
    value: Value,
    test: Option<String>,
    args: Rest<ValueOrKwargs>,
) -> Result<Value, Error> {
    generator(state, value, |state, value| minijinja::filters::reject(state, value, test.map(Into::into), args))
}

fn selectattr_generator(
    state: &mut State,
    value: Value,
    attr: String,
    test: Option<String>,
    args: Rest<ValueOrKwargs>,
) -> Result<Value, Error> {
    generator(state, value, |state, value| {
        minijinja::filters::selectattr(state, value, attr.into(), test.map(Into::into), args)
    })
}

fn rejectattr_generator(
    state: &mut State,
    value: Value,
    attr: String,
    test: Option<String>,
    args: Rest<ValueOrKwargs>,
) -> Result<Value, Error> {
    generator(state, value, |state, value| {
        minijinja::filters::rejectattr(state, value, attr.into(), test.map(Into::into), args)
    })
}

/// markupsafe's `escape`: `str(value)` with `& < > " '` as `&amp; &lt; &gt; &#34; &#39;`.
/// Jinja2's `indent(width=4, first=False, blank=False)`: the lines after
/// the first indented by `width` spaces (or that string), the first too with
/// `first`, blank lines too with `blank`. As in Jinja2, a trailing newline
/// stays (minijinja's own filter drops it) and lines split where Python's
/// `splitlines` splits.
fn indent(
    value: String,
    width: Option<Value>,
    first: Option<bool>,
    blank: Option<bool>,
    kwargs: Kwargs,
) -> Result<String, Error> {
    let width = match width {
        Some(w) => Some(w),
        None => kwargs.get::<Option<Value>>("width")?,
    };
    let first = first.map_or_else(|| kwargs.get::<Option<bool>>("first"), |f| Ok(Some(f)))?.unwrap_or(false);
    let blank = blank.map_or_else(|| kwargs.get::<Option<bool>>("blank"), |b| Ok(Some(b)))?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let indention = match &width {
        None => "    ".to_string(),
        Some(w) if w.kind() == ValueKind::String => w.as_str().unwrap_or_default().to_string(),
        Some(w) => " ".repeat(
            i64::try_from(w.clone())
                .map_err(|_| Error::new(ErrorKind::InvalidOperation, "indent: width must be a number or a string"))?
                .max(0) as usize,
        ),
    };
    // Jinja2 appends a newline before splitting, which keeps a trailing one.
    let text = value + "\n";
    let lines = python_splitlines(&text);
    let mut out = String::with_capacity(text.len() + lines.len() * indention.len());
    for (i, line) in lines.iter().enumerate() {
        if i > 0 {
            out.push('\n');
            if blank || !line.is_empty() {
                out.push_str(&indention);
            }
        }
        out.push_str(line);
    }
    if first {
        out.insert_str(0, &indention);
    }
    Ok(out)
}

/// Python's `str.splitlines()`: lines without their ends, split at every
/// line boundary Python knows.
fn python_splitlines(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let end = match c {
            '\r' => match chars.peek() {
                Some(&(_, '\n')) => {
                    chars.next();
                    at + 2
                }
                _ => at + 1,
            },
            '\n' | '\u{0b}' | '\u{0c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}' => {
                at + c.len_utf8()
            }
            _ => continue,
        };
        lines.push(&text[start..at]);
        start = end;
    }
    if start < text.len() {
        lines.push(&text[start..]);
    }
    lines
}

fn markupsafe_escape(value: &Value) -> Value {
    if value.is_safe() {
        return value.clone();
    }
    let text = match value.kind() {
        ValueKind::String => value.as_str().unwrap_or_default().to_string(),
        ValueKind::Undefined => String::new(),
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => pyjson::repr(value),
        ValueKind::Number => pyjson::number_repr(value),
        _ => value.to_string(),
    };
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Value::from_safe_string(out)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, "raise_exception called").with_source(Raised(message)))
}

fn strftime(now: &NaiveDateTime, format: &str) -> Result<String, Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", now.format(format))
        .map_err(|_| Error::new(ErrorKind::InvalidOperation, format!("invalid strftime format {format:?}")))?;
    Ok(out)
}

/// `x | tojson(indent=None, separators=None, sort_keys=False, ensure_ascii=False)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let mut opts = DumpOptions::default();
    let invalid = |msg: String| Error::new(ErrorKind::InvalidOperation, msg);
    if let Some(indent) = kwargs.get::<Option<Value>>("indent")? {
        opts.indent = match indent.kind() {
            ValueKind::None => None,
            ValueKind::String => Some(indent.as_str().unwrap_or_default().to_string()),
            ValueKind::Number => Some(" ".repeat(i64::try_from(indent).unwrap_or(0).max(0) as usize)),
            _ => return Err(invalid("tojson: indent must be an integer or a string".into())),
        };
        if opts.indent.is_some() {
            opts.item_separator = ",".into();
        }
    }
    if let Some(separators) = kwargs.get::<Option<Value>>("separators")? {
        if !separators.is_none() {
            let parts: Vec<String> = separators
                .try_iter()?
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid("tojson: separators must be two strings".into()))?;
            let [item, key] =
                <[String; 2]>::try_from(parts).map_err(|_| invalid("tojson: separators must be two strings".into()))?;
            opts.item_separator = item;
            opts.key_separator = key;
        }
    }
    if let Some(sort) = kwargs.get::<Option<bool>>("sort_keys")? {
        opts.sort_keys = sort;
    }
    if let Some(ascii) = kwargs.get::<Option<bool>>("ensure_ascii")? {
        opts.ensure_ascii = ascii;
    }
    kwargs.assert_all_used()?;
    pyjson::dumps(&value, &opts).map(Value::from).map_err(|msg| Error::new(ErrorKind::InvalidOperation, msg))
}

/// Prints values as Python's `str()` would: `None`, `True`, `['a', 1]`.
fn python_formatter(out: &mut minijinja::Output, _state: &mut State, value: &Value) -> Result<(), Error> {
    let text = match value.kind() {
        ValueKind::Undefined => return Ok(()),
        ValueKind::String => return out.write_str(value.as_str().unwrap_or_default()).map_err(Error::from),
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => pyjson::repr(value),
        ValueKind::Number => pyjson::number_repr(value),
        _ => value.to_string(),
    };
    out.write_str(&text).map_err(Error::from)
}

/// transformers' `{% generation %}` tag only marks assistant spans; it renders
/// its body unchanged. minijinja has no custom tags, so it becomes an `if`.
pub fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` comes after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, trail) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_tag_delimiters_do_not_panic() {
        // `{%}` once panicked the loader; now minijinja reports the syntax error.
        assert_eq!(rewrite_generation_tags("a {%} b"), "a {%} b");
        for source in ["{%}", "{%", "%}{%", "{%-}", "{%+%}"] {
            assert_eq!(rewrite_generation_tags(source), source);
        }
        assert!(crate::prompt::ChatTemplate::new("{%}", None, None, Clock::Local).is_err());
    }
    use crate::prompt::FromSerde;

    fn render(src: &str, ctx: Value) -> Result<String, Error> {
        let env = environment(Clock::Frozen(
            NaiveDateTime::parse_from_str("2024-02-29T23:59:58", "%Y-%m-%dT%H:%M:%S").expect("date"),
        ));
        env.render_str(&rewrite_generation_tags(src), ctx)
    }

    #[test]
    fn whitespace_rules_match_transformers() -> Result<(), Error> {
        let src = "{% for m in messages %}\n  {% if true %}\n[{{ m }}]\n  {% endif %}\n{% endfor %}\n";
        assert_eq!(render(src, minijinja::context! { messages => vec!["a", "b"] })?, "[a]\n[b]\n");
        Ok(())
    }

    #[test]
    fn python_printing_and_methods() -> Result<(), Error> {
        let ctx = minijinja::context! { x => Value::from_serde(serde_json::json!({"a": [true, null, 1.5]})) };
        assert_eq!(render("{{ x }}", ctx.clone())?, "{'a': [True, None, 1.5]}");
        assert_eq!(render("{{ '  hi  '.strip() }}|{{ 'a b'.split() }}", ctx.clone())?, "hi|['a', 'b']");
        assert_eq!(render("{{ x | tojson }}", ctx.clone())?, r#"{"a": [true, null, 1.5]}"#);
        assert_eq!(render("{{ x | tojson(separators=(',', ':')) }}", ctx)?, r#"{"a":[true,null,1.5]}"#);
        Ok(())
    }

    #[test]
    fn indent_is_jinja2s_trailing_newline_included() -> Result<(), Error> {
        // Expected outputs rendered by Jinja2 3.1.6.
        for (src, want) in [
            ("{{ 'a\\nb\\n' | indent }}", "a\n    b\n"),
            ("{{ 'a\\n\\nb' | indent(2) }}", "a\n\n  b"),
            ("{{ 'a\\n\\nb' | indent(2, blank=true) }}", "a\n  \n  b"),
            ("{{ 'a\\nb' | indent(width='> ', first=true) }}", "> a\n> b"),
            ("{{ 'a\\r\\nb\\x0bc' | indent(1) }}", "a\n b\n c"),
            ("{{ '' | indent }}", ""),
            ("{{ 'one' | indent(4, true) }}", "    one"),
        ] {
            assert_eq!(render(src, Value::UNDEFINED)?, want, "{src}");
        }
        Ok(())
    }

    #[test]
    fn raise_exception_carries_the_message() {
        let err = render("{{ raise_exception('Only user and assistant roles!') }}", Value::UNDEFINED);
        let err = err.expect_err("must fail");
        assert_eq!(raised_message(&err).as_deref(), Some("Only user and assistant roles!"));
    }

    #[test]
    fn strftime_now_uses_the_clock_and_loop_controls_work() -> Result<(), Error> {
        assert_eq!(render("{{ strftime_now('%d %b %Y') }}", Value::UNDEFINED)?, "29 Feb 2024");
        let src = "{% for i in [1,2,3,4] %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}";
        assert_eq!(render(src, Value::UNDEFINED)?, "13");
        Ok(())
    }

    #[test]
    fn generation_tag_renders_its_body() -> Result<(), Error> {
        assert_eq!(render("a{%- generation -%} b {%- endgeneration %}c", Value::UNDEFINED)?, "abc");
        Ok(())
    }

    #[test]
    fn infinite_loops_run_out_of_fuel() {
        let src = "{% for i in range(1000000) %}{% for j in range(1000000) %}x{% endfor %}{% endfor %}";
        assert!(render(src, Value::UNDEFINED).is_err());
    }
}
