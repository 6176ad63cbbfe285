//! Shared mail templates: kept in Redis so every app on the host (Node, Python, a
//! cron job) renders the same "results published" mail, rendered with minijinja at
//! enqueue (the queued message is fixed then: changing a template later does not
//! change mail already queued).
//!
//! Strict: a variable the template uses and `vars` lacks is `INVALID_MAIL` naming it.
//! The html part is auto-escaped, subject and text are not. Rendering is bounded by
//! minijinja's fuel, so a template with a huge loop cannot hold the daemon.

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};

/// A template as stored (JSON in the `<K>:tpl` hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

/// What rendering made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
}

/// Instructions one render may run (minijinja fuel).
const FUEL: u64 = 1_000_000;

fn env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env.set_auto_escape_callback(|name| {
        if name == "html" {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    env
}

/// Why a template or a render failed: the field to name, and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: &'static str,
    pub message: String,
}

impl Stored {
    fn parts(&self) -> [(&'static str, Option<&str>); 3] {
        [
            ("subject", Some(self.subject.as_str())),
            ("text", self.text.as_deref()),
            ("html", self.html.as_deref()),
        ]
    }

    /// Every part compiles.
    pub fn check(&self) -> Result<(), Problem> {
        if self.text.is_none() && self.html.is_none() {
            return Err(Problem {
                field: "text",
                message: "a template needs text, html, or both".into(),
            });
        }
        let mut env = env();
        for (name, src) in self.parts() {
            if let Some(src) = src {
                env.add_template(name, src).map_err(|e| Problem {
                    field: name,
                    message: format!("{name}: {e}"),
                })?;
            }
        }
        Ok(())
    }

    /// Renders every part with `vars` (a map). A variable a part uses and `vars`
    /// lacks is named; an html-only template gets a text part made from its html.
    pub fn render(&self, vars: &serde_json::Value) -> Result<Rendered, Problem> {
        let mut env = env();
        let vars_problem = |message: String| Problem {
            field: "vars",
            message,
        };
        if !vars.is_object() && !vars.is_null() {
            return Err(vars_problem("vars must be a map".into()));
        }
        let mut out = Vec::new();
        for (name, src) in self.parts() {
            let Some(src) = src else {
                out.push(None);
                continue;
            };
            env.add_template(name, src).map_err(|e| Problem {
                field: "template",
                message: format!("the stored template's {name} does not compile: {e}"),
            })?;
            let tpl = env
                .get_template(name)
                .map_err(|e| vars_problem(e.to_string()))?;
            let mut missing: Vec<String> = tpl
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| vars.get(v).is_none())
                .collect();
            if !missing.is_empty() {
                missing.sort();
                return Err(vars_problem(format!(
                    "the template's {name} uses {} that vars does not give",
                    missing
                        .iter()
                        .map(|m| format!("`{m}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let rendered = tpl
                .render(minijinja::Value::from(minijinja::value::Serde(vars)))
                .map_err(|e| vars_problem(format!("rendering the {name}: {e}")))?;
            out.push(Some(rendered));
        }
        let (subject, text, html) = match <[Option<String>; 3]>::try_from(out) {
            Ok([s, t, h]) => (s.unwrap_or_default(), t, h),
            Err(_) => return Err(vars_problem("rendering failed".into())),
        };
        let text = text.or_else(|| html.as_deref().map(html_to_text));
        Ok(Rendered {
            subject: subject.trim().replace(['\r', '\n'], " "),
            text,
            html,
        })
    }
}

/// A plain-text rendering of html for the text part of an html-only template: tags
/// dropped (block ends and `<br>` become line breaks), the common entities decoded,
/// blank runs collapsed. Hand-written: the html2text crate pulls in a whole html5ever
/// parser for what mail bodies need here.
pub fn html_to_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let Some(gt) = rest[lt..].find('>') else {
            rest = &rest[lt..];
            break;
        };
        let tag = rest[lt + 1..lt + gt]
            .trim_start_matches('/')
            .to_ascii_lowercase();
        let name = tag
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or("");
        if matches!(
            name,
            "br" | "p" | "div" | "tr" | "li" | "h1" | "h2" | "h3" | "h4" | "table"
        ) {
            out.push('\n');
        }
        rest = &rest[lt + gt + 1..];
    }
    out.push_str(rest);
    let decoded = out
        .replace("&nbsp;", " ")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&#x2f;", "/")
        .replace("&amp;", "&");
    let mut lines: Vec<String> = Vec::new();
    for line in decoded.lines() {
        let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if !(line.is_empty() && lines.last().is_some_and(String::is_empty)) {
            lines.push(line);
        }
    }
    lines.join("\n").trim().to_owned()
}

/// A MessagePack value as JSON, for minijinja (binary as lossy UTF-8, map keys as
/// strings, extension types as null).
pub fn to_json(v: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        M::Nil | M::Ext(..) => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => i
            .as_i64()
            .map(J::from)
            .or_else(|| i.as_u64().map(J::from))
            .unwrap_or(J::Null),
        M::F32(f) => serde_json::Number::from_f64(*f as f64).map_or(J::Null, J::Number),
        M::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        M::String(s) => J::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        M::Binary(b) => J::String(String::from_utf8_lossy(b).into_owned()),
        M::Array(a) => J::Array(a.iter().map(to_json).collect()),
        M::Map(m) => J::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match k {
                        M::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                        other => other.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tpl(subject: &str, text: Option<&str>, html: Option<&str>) -> Stored {
        Stored {
            subject: subject.into(),
            text: text.map(Into::into),
            html: html.map(Into::into),
        }
    }

    #[test]
    fn html_is_escaped_text_is_not_and_missing_vars_are_named() {
        let t = tpl(
            "Results for {{ name }}",
            Some("Hi {{ name }}, {{ score }}/100"),
            Some("<p>Hi {{ name }}</p>"),
        );
        t.check().unwrap();
        let r = t
            .render(&json!({"name": "<script>x</script>", "score": 91}))
            .unwrap();
        assert_eq!(r.subject, "Results for <script>x</script>");
        assert_eq!(r.text.as_deref(), Some("Hi <script>x</script>, 91/100"));
        assert_eq!(
            r.html.as_deref(),
            Some("<p>Hi &lt;script&gt;x&lt;&#x2f;script&gt;</p>")
        );
        let e = t.render(&json!({"name": "Ann"})).unwrap_err();
        assert_eq!(e.field, "vars");
        assert!(e.message.contains("`score`"), "{}", e.message);
    }

    #[test]
    fn an_html_only_template_gets_a_text_part_and_bad_templates_are_refused() {
        let t = tpl(
            "S",
            None,
            Some("<h1>Résultats</h1><p>Élève {{ n }} &amp; co<br>fin</p>"),
        );
        let r = t.render(&json!({"n": "Zoë"})).unwrap();
        assert_eq!(r.text.as_deref(), Some("Résultats\n\nÉlève Zoë & co\nfin"));
        assert_eq!(
            tpl("{{ x", Some("t"), None).check().unwrap_err().field,
            "subject"
        );
        assert_eq!(tpl("s", None, None).check().unwrap_err().field, "text");
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel() {
        let t = tpl(
            "s",
            Some(
                "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            ),
            None,
        );
        let e = t.render(&json!({})).unwrap_err();
        assert_eq!(e.field, "vars");
    }
}
