//! Request templates of the `generic` connector: text with `{{placeholder}}`s, parsed once at
//! start-up (an unknown placeholder stops the vault from starting) and rendered per charge
//! into a zeroizing buffer.
//!
//! Placeholders (spaces inside the braces are allowed: `{{ amount }}`):
//!
//! | placeholder | value |
//! |---|---|
//! | `{{card.number}}` | the PAN's digits |
//! | `{{card.exp_month}}` | expiry month, `1`–`12`, no leading zero |
//! | `{{card.exp_year}}` | expiry year, four digits |
//! | `{{card.cvc}}` | the CVC, or empty when the charge has none |
//! | `{{card.holder}}` | the cardholder name, or empty |
//! | `{{amount}}` | amount in minor units, e.g. `1999` |
//! | `{{currency}}` | ISO 4217 code, upper-case, e.g. `EUR` |
//! | `{{idempotency_key}}` | the vault's charge id (`ch_…`), its gateway key, stable across re-sends |
//! | `{{description}}` | the charge description |
//! | `{{capture}}` | `automatic` or `manual` |
//! | `{{secret}}` | the gateway's API secret |
//!
//! How a value is escaped depends on where it goes ([`Escape`]): in a JSON body it renders
//! as JSON string *content* without quotes (the template writes `"{{card.number}}"`, or
//! `{{amount}}` bare for a number); in a form body it is percent-encoded; in a header it is
//! copied as is and must be a valid header value.

use super::{
    Capture, ChargeCard, ChargeParams,
    encode::{self, Sink},
};
use zeroize::Zeroizing;

/// A value a template can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Field {
    CardNumber,
    ExpMonth,
    ExpYear,
    Cvc,
    Holder,
    Amount,
    Currency,
    IdempotencyKey,
    Description,
    Capture,
    Secret,
}

impl Field {
    const ALL: [(&'static str, Field); 11] = [
        ("card.number", Field::CardNumber),
        ("card.exp_month", Field::ExpMonth),
        ("card.exp_year", Field::ExpYear),
        ("card.cvc", Field::Cvc),
        ("card.holder", Field::Holder),
        ("amount", Field::Amount),
        ("currency", Field::Currency),
        ("idempotency_key", Field::IdempotencyKey),
        ("description", Field::Description),
        ("capture", Field::Capture),
        ("secret", Field::Secret),
    ];

    fn from_name(name: &str) -> Option<Field> {
        Field::ALL
            .iter()
            .find_map(|(n, f)| (*n == name).then_some(*f))
    }

    /// Whether the value is card data (never allowed in headers).
    pub(crate) fn is_card(self) -> bool {
        matches!(
            self,
            Field::CardNumber | Field::ExpMonth | Field::ExpYear | Field::Cvc | Field::Holder
        )
    }
}

/// How placeholder values are escaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Escape {
    /// JSON string content without the quotes.
    Json,
    /// `application/x-www-form-urlencoded` component.
    Form,
    /// Copied as is (headers; the result is checked as a header value).
    Raw,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Field(Field),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Template {
    segments: Vec<Segment>,
}

/// Longest placeholder name echoed in an error (the rest is cut).
const MAX_ECHOED_NAME: usize = 40;

impl Template {
    /// Parses `text`. Errors say which placeholder is unknown or that a `{{` is not closed;
    /// they quote the placeholder's name only, never the surrounding template.
    pub(crate) fn parse(text: &str) -> Result<Template, String> {
        let mut segments = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                segments.push(Segment::Literal(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err("a '{{' has no closing '}}'".to_owned());
            };
            let name = after[..close].trim();
            let field = Field::from_name(name).ok_or_else(|| {
                let shown: String = name.chars().take(MAX_ECHOED_NAME).collect();
                format!(
                    "unknown placeholder {{{{{shown}}}}}; known: {}",
                    Field::ALL
                        .iter()
                        .map(|(n, _)| format!("{{{{{n}}}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            segments.push(Segment::Field(field));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(rest.to_owned()));
        }
        Ok(Template { segments })
    }

    /// The placeholders used, in order of appearance.
    pub(crate) fn fields(&self) -> impl Iterator<Item = Field> + '_ {
        self.segments.iter().filter_map(|s| match s {
            Segment::Field(f) => Some(*f),
            Segment::Literal(_) => None,
        })
    }

    /// Renders into a zeroizing buffer of exactly the right size.
    pub(crate) fn render(&self, values: &Values<'_>, escape: Escape) -> Zeroizing<Vec<u8>> {
        encode::build(|sink| self.write(values, escape, sink))
    }

    fn write(&self, values: &Values<'_>, escape: Escape, sink: &mut dyn Sink) {
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => sink.put(text.as_bytes()),
                Segment::Field(field) => {
                    let value = values.get(*field);
                    match escape {
                        Escape::Json => encode::json_string_content(value, sink),
                        Escape::Form => encode::form_component(value, sink),
                        Escape::Raw => sink.put(value.as_bytes()),
                    }
                }
            }
        }
    }
}

/// The values of one charge, borrowed, with the numbers formatted once.
pub(crate) struct Values<'a> {
    card: &'a ChargeCard<'a>,
    params: &'a ChargeParams<'a>,
    secret: &'a str,
    exp_month: Zeroizing<String>,
    exp_year: Zeroizing<String>,
    amount: String,
}

impl<'a> Values<'a> {
    /// `secret` is empty for a gateway without one (its templates cannot use `{{secret}}`).
    pub(crate) fn new(
        card: &'a ChargeCard<'a>,
        params: &'a ChargeParams<'a>,
        secret: &'a str,
    ) -> Values<'a> {
        Values {
            card,
            params,
            secret,
            exp_month: Zeroizing::new(card.exp_month.to_string()),
            exp_year: Zeroizing::new(card.exp_year.to_string()),
            amount: params.amount.to_string(),
        }
    }

    fn get(&self, field: Field) -> &str {
        match field {
            Field::CardNumber => self.card.pan.expose_digits(),
            Field::ExpMonth => &self.exp_month,
            Field::ExpYear => &self.exp_year,
            Field::Cvc => self.card.cvc.unwrap_or(""),
            Field::Holder => self.card.holder.unwrap_or(""),
            Field::Amount => &self.amount,
            Field::Currency => self.params.currency.as_str(),
            Field::IdempotencyKey => self.params.charge_id.as_str(),
            Field::Description => self.params.description,
            Field::Capture => match self.params.capture {
                Capture::Automatic => "automatic",
                Capture::Manual => "manual",
            },
            Field::Secret => self.secret,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::card::Pan;

    fn render(template: &str, escape: Escape, holder: Option<&str>) -> String {
        let pan = Pan::parse("4242424242424242").unwrap();
        let card = ChargeCard {
            pan: &pan,
            exp_month: 3,
            exp_year: 2031,
            cvc: Some("123"),
            holder,
        };
        let charge_id = crate::id::ChargeId::parse("ch_000000000000key1").unwrap();
        let params = ChargeParams {
            amount: 1999,
            currency: crate::money::Currency::parse("EUR").unwrap(),
            capture: Capture::Manual,
            description: "order \"42\" & co",
            metadata: &[],
            charge_id: &charge_id,
            resend: false,
        };
        let values = Values::new(&card, &params, "sk_test");
        let template = Template::parse(template).unwrap();
        String::from_utf8(template.render(&values, escape).to_vec()).unwrap()
    }

    #[test]
    fn every_placeholder_renders_its_value() {
        let text = "{{card.number}}|{{card.exp_month}}|{{card.exp_year}}|{{card.cvc}}|\
                    {{card.holder}}|{{amount}}|{{currency}}|{{idempotency_key}}|{{capture}}|\
                    {{secret}}";
        assert_eq!(
            render(text, Escape::Raw, Some("Ada")),
            "4242424242424242|3|2031|123|Ada|1999|EUR|ch_000000000000key1|manual|sk_test"
        );
    }

    #[test]
    fn spaces_inside_braces_are_allowed_and_a_missing_holder_is_empty() {
        assert_eq!(render("[{{ card.holder }}]", Escape::Raw, None), "[]");
    }

    #[test]
    fn json_bodies_escape_values_and_keep_the_template_quotes() {
        let rendered = render(
            r#"{"amount": {{amount}}, "description": "{{description}}", "name": "{{card.holder}}"}"#,
            Escape::Json,
            Some("O\"Brien\\\n"),
        );
        let value: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(value["amount"], 1999);
        assert_eq!(value["description"], "order \"42\" & co");
        assert_eq!(value["name"], "O\"Brien\\\n");
    }

    #[test]
    fn form_bodies_percent_encode_values_but_not_the_template() {
        assert_eq!(
            render(
                "card[number]={{card.number}}&d={{description}}",
                Escape::Form,
                None
            ),
            "card[number]=4242424242424242&d=order+%2242%22+%26+co"
        );
    }

    #[test]
    fn an_unknown_placeholder_is_refused_by_name() {
        let err = Template::parse(r#"{"n": "{{card.pan}}"}"#).unwrap_err();
        assert!(err.contains("{{card.pan}}"), "{err}");
        assert!(
            err.contains("{{card.number}}"),
            "lists the known ones: {err}"
        );
        let err = Template::parse("a {{amount").unwrap_err();
        assert!(err.contains("no closing"), "{err}");
    }

    #[test]
    fn text_without_placeholders_is_one_literal() {
        let t = Template::parse("plain } { text").unwrap();
        assert_eq!(t.fields().count(), 0);
        let t = Template::parse("{{amount}}{{secret}}").unwrap();
        assert_eq!(
            t.fields().collect::<Vec<_>>(),
            [Field::Amount, Field::Secret]
        );
        assert!(Field::CardNumber.is_card() && !Field::Secret.is_card());
    }
}
