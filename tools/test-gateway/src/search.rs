//! Stripe's search query language, as far as PaymentIntents need it: clauses
//! `field:value` joined by `AND` or by `OR` (never both in one query), each optionally
//! negated with `-`. Fields: `metadata['key']` (or `metadata["key"]`), `status`, `currency`,
//! `customer` (quoted strings) and `amount` (an integer). Stripe allows at most ten clauses.

use serde_json::Value;

/// Stripe's limit on clauses in one query.
const MAX_CLAUSES: usize = 10;

/// A parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    clauses: Vec<Clause>,
    /// `OR` between the clauses; `AND` otherwise.
    any: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Clause {
    field: Field,
    value: String,
    negated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Metadata(String),
    Status,
    Currency,
    Customer,
    Amount,
}

/// Why a query does not parse: Stripe's wording, naming the offending spot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "We were unable to parse your search query. {0} Try using the format \
     `metadata[\"key\"]:\"value\"` to query for metadata or `key:\"value\"` to query for other \
     fields."
)]
pub struct QueryError(String);

impl Query {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        let mut p = Parser { rest: text.trim() };
        if p.rest.is_empty() {
            return Err(QueryError("The query is empty.".into()));
        }
        let mut clauses = vec![p.clause()?];
        let mut joiner: Option<&str> = None;
        while !p.rest.is_empty() {
            let word = p.joiner()?;
            if joiner.is_some_and(|seen| seen != word) {
                return Err(QueryError("A query cannot mix AND and OR.".to_owned()));
            }
            joiner = Some(word);
            clauses.push(p.clause()?);
            if clauses.len() > MAX_CLAUSES {
                return Err(QueryError(format!(
                    "A query takes at most {MAX_CLAUSES} clauses."
                )));
            }
        }
        Ok(Query {
            clauses,
            any: joiner == Some("OR"),
        })
    }

    /// Whether the PaymentIntent `intent` matches.
    pub fn matches(&self, intent: &Value) -> bool {
        let hit = |clause: &Clause| clause.matches(intent) != clause.negated;
        if self.any {
            self.clauses.iter().any(hit)
        } else {
            self.clauses.iter().all(hit)
        }
    }
}

impl Clause {
    fn matches(&self, intent: &Value) -> bool {
        match &self.field {
            Field::Metadata(key) => intent["metadata"][key.as_str()] == self.value.as_str(),
            Field::Status => intent["status"] == self.value.as_str(),
            Field::Currency => intent["currency"]
                .as_str()
                .is_some_and(|c| c.eq_ignore_ascii_case(&self.value)),
            Field::Customer => intent["customer"] == self.value.as_str(),
            Field::Amount => {
                intent["amount"].as_i64().map(|a| a.to_string()) == Some(self.value.clone())
            }
        }
    }
}

struct Parser<'a> {
    rest: &'a str,
}

impl Parser<'_> {
    fn clause(&mut self) -> Result<Clause, QueryError> {
        let negated = self.eat("-");
        let name_len = self
            .rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.rest.len());
        let (name, rest) = self.rest.split_at(name_len);
        self.rest = rest;
        let field = match name {
            "metadata" => {
                if !self.eat("[") {
                    return Err(QueryError(
                        "`metadata` must be followed by a quoted key in brackets.".to_owned(),
                    ));
                }
                let key = self.quoted()?;
                if !self.eat("]") {
                    return Err(QueryError("A metadata key must end with `]`.".to_owned()));
                }
                Field::Metadata(key)
            }
            "status" => Field::Status,
            "currency" => Field::Currency,
            "customer" => Field::Customer,
            "amount" => Field::Amount,
            "" => {
                return Err(QueryError(
                    "A clause must start with a field name.".to_owned(),
                ));
            }
            // Not echoed: the query is the caller's text, whatever it holds.
            _ => {
                return Err(QueryError(
                    "A field is not supported for search on payment_intents.".to_owned(),
                ));
            }
        };
        if !self.eat(":") {
            return Err(QueryError(
                "A field must be followed by `:` and a value.".to_owned(),
            ));
        }
        let value = if matches!(field, Field::Amount) {
            let digits = self
                .rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(self.rest.len());
            if digits == 0 {
                return Err(QueryError("`amount` takes an integer.".to_owned()));
            }
            let (number, rest) = self.rest.split_at(digits);
            self.rest = rest;
            number.to_owned()
        } else {
            self.quoted()?
        };
        Ok(Clause {
            field,
            value,
            negated,
        })
    }

    /// `AND` or `OR` between clauses, with the spaces around it.
    fn joiner(&mut self) -> Result<&'static str, QueryError> {
        let trimmed = self.rest.trim_start();
        if trimmed.len() == self.rest.len() {
            return Err(QueryError(
                "Clauses must be separated by spaces and AND or OR.".to_owned(),
            ));
        }
        for word in ["AND", "OR"] {
            if let Some(after) = trimmed.strip_prefix(word)
                && after.starts_with(char::is_whitespace)
            {
                self.rest = after.trim_start();
                return Ok(word);
            }
        }
        Err(QueryError(
            "Clauses must be joined with AND or OR.".to_owned(),
        ))
    }

    /// A string in single or double quotes; a backslash escapes the next character.
    fn quoted(&mut self) -> Result<String, QueryError> {
        let mut chars = self.rest.char_indices();
        let quote = match chars.next() {
            Some((_, q @ ('\'' | '"'))) => q,
            _ => return Err(QueryError("Values must be quoted.".to_owned())),
        };
        let mut out = String::new();
        let mut escaped = false;
        for (at, c) in chars {
            if escaped {
                out.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == quote {
                self.rest = &self.rest[at + c.len_utf8()..];
                return Ok(out);
            } else {
                out.push(c);
            }
        }
        Err(QueryError("A quoted value is not closed.".to_owned()))
    }

    fn eat(&mut self, token: &str) -> bool {
        match self.rest.strip_prefix(token) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn intent() -> Value {
        json!({
            "amount": 1234,
            "currency": "usd",
            "status": "succeeded",
            "customer": null,
            "metadata": {"charge_id": "ch_1", "order": "it's 42"},
        })
    }

    #[test]
    fn metadata_clauses_match_exactly_in_either_quote() {
        let hit = Query::parse("metadata['charge_id']:'ch_1'").unwrap();
        let also = Query::parse("metadata[\"charge_id\"]:\"ch_1\"").unwrap();
        let miss = Query::parse("metadata['charge_id']:'ch_10'").unwrap();
        assert!(hit.matches(&intent()));
        assert!(also.matches(&intent()));
        assert!(!miss.matches(&intent()));
        let escaped = Query::parse(r"metadata['order']:'it\'s 42'").unwrap();
        assert!(escaped.matches(&intent()));
    }

    #[test]
    fn and_needs_every_clause_or_needs_one_and_minus_negates() {
        let and = Query::parse("metadata['charge_id']:'ch_1' AND status:'succeeded'").unwrap();
        let and_miss = Query::parse("metadata['charge_id']:'ch_1' AND status:'canceled'").unwrap();
        let or = Query::parse("status:'canceled' OR amount:1234").unwrap();
        let not = Query::parse("-status:'succeeded'").unwrap();
        assert!(and.matches(&intent()));
        assert!(!and_miss.matches(&intent()));
        assert!(or.matches(&intent()));
        assert!(!not.matches(&intent()));
        assert!(Query::parse("currency:'USD'").unwrap().matches(&intent()));
    }

    #[test]
    fn malformed_queries_are_refused() {
        for bad in [
            "",
            "metadata['a']",
            "metadata[a]:'b'",
            "metadata['a']:b",
            "metadata['a']:'b",
            "status:'a' AND",
            "status:'a' and status:'b'",
            "status:'a' AND status:'b' OR status:'c'",
            "status:'a'status:'b'",
            "pan:'4242'",
            "amount:'12'",
        ] {
            assert!(Query::parse(bad).is_err(), "{bad}");
        }
        let many = ["status:'a'"; MAX_CLAUSES + 1].join(" OR ");
        assert!(Query::parse(&many).is_err());
    }
}
