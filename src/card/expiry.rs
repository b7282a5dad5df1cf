//! Card expiry month and year.

use time::Date;

/// How far ahead an expiry year may lie. Real cards are issued for at most a few years;
/// fifty leaves room for every scheme while catching typos such as `2226` or `99`.
const MAX_YEARS_AHEAD: i32 = 50;

/// A card's expiry: month 1 to 12 and a four-digit year (a two-digit year `yy` means
/// `20yy`). A card is valid through the last day of its expiry month, in UTC.
///
/// Month and year are not secret (they are stored in clear beside the token), so `Debug` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    month: u8,
    year: u16,
}

/// Why an expiry was rejected. Messages describe the rule and never echo the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExpiryError {
    /// Not 1 to 12.
    #[error("expiry month must be 1 to 12")]
    InvalidMonth,
    /// Not a two-digit year or 2000 to 2099, or more than 50 years ahead.
    #[error("expiry year must be two digits or 2000 to 2099, and at most 50 years ahead")]
    InvalidYear,
    /// The last day of the expiry month is in the past.
    #[error("card has expired")]
    Expired,
}

impl Expiry {
    /// Validates an expiry as of `today` (UTC). Reports the first problem found; use
    /// [`Card::parse`](super::Card::parse) to get every problem of a card at once.
    pub fn new(month: u32, year: u32, today: Date) -> Result<Expiry, ExpiryError> {
        let month = month_from(month)?;
        let year = year_from(year, today)?;
        Expiry::unexpired(month, year, today)
    }

    /// The month, 1 to 12.
    pub fn month(&self) -> u8 {
        self.month
    }

    /// The four-digit year.
    pub fn year(&self) -> u16 {
        self.year
    }

    /// Whether the card can no longer be used on `today`, i.e. its expiry month has ended.
    pub fn is_expired_on(&self, today: Date) -> bool {
        (i32::from(self.year), self.month) < (today.year(), u8::from(today.month()))
    }

    /// Builds an expiry from an already valid month and year, failing only if it is over.
    pub(super) fn unexpired(month: u8, year: u16, today: Date) -> Result<Expiry, ExpiryError> {
        let expiry = Expiry { month, year };
        if expiry.is_expired_on(today) {
            Err(ExpiryError::Expired)
        } else {
            Ok(expiry)
        }
    }
}

/// Checks the month alone, so a caller can report month and year problems together.
pub(super) fn month_from(month: u32) -> Result<u8, ExpiryError> {
    u8::try_from(month)
        .ok()
        .filter(|m| (1..=12).contains(m))
        .ok_or(ExpiryError::InvalidMonth)
}

/// Checks the year alone and widens a two-digit year to `20yy`.
pub(super) fn year_from(year: u32, today: Date) -> Result<u16, ExpiryError> {
    let year = match year {
        0..=99 => 2000 + year,
        2000..=2099 => year,
        _ => return Err(ExpiryError::InvalidYear),
    };
    // Both conversions succeed for 2000..=2099; failing closed keeps this panic-free.
    let year = u16::try_from(year).map_err(|_| ExpiryError::InvalidYear)?;
    if i32::from(year) - today.year() > MAX_YEARS_AHEAD {
        return Err(ExpiryError::InvalidYear);
    }
    Ok(year)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    const TODAY: Date = date!(2026 - 05 - 15);

    #[test]
    fn months_zero_and_thirteen_are_rejected() {
        assert_eq!(Expiry::new(0, 2030, TODAY), Err(ExpiryError::InvalidMonth));
        assert_eq!(Expiry::new(13, 2030, TODAY), Err(ExpiryError::InvalidMonth));
        assert_eq!(
            Expiry::new(u32::MAX, 2030, TODAY),
            Err(ExpiryError::InvalidMonth)
        );
    }

    #[test]
    fn every_month_from_one_to_twelve_is_accepted() {
        for month in 1..=12 {
            let expiry = Expiry::new(month, 2030, TODAY).expect("valid");
            assert_eq!(u32::from(expiry.month()), month);
        }
    }

    #[test]
    fn a_two_digit_year_means_this_century() {
        let expiry = Expiry::new(7, 29, TODAY).expect("valid");
        assert_eq!(expiry.year(), 2029);
        assert_eq!(expiry.month(), 7);
    }

    #[test]
    fn a_four_digit_year_is_kept() {
        assert_eq!(Expiry::new(7, 2031, TODAY).expect("valid").year(), 2031);
    }

    #[test]
    fn the_current_month_is_still_valid_until_its_last_day() {
        let expiry = Expiry::new(5, 2026, TODAY).expect("valid this month");
        assert!(!expiry.is_expired_on(date!(2026 - 05 - 31)));
        assert!(expiry.is_expired_on(date!(2026 - 06 - 01)));
    }

    #[test]
    fn last_month_is_expired() {
        assert_eq!(Expiry::new(4, 2026, TODAY), Err(ExpiryError::Expired));
        assert_eq!(Expiry::new(12, 25, TODAY), Err(ExpiryError::Expired));
    }

    #[test]
    fn years_outside_the_two_and_four_digit_forms_are_rejected() {
        for year in [1999, 100, 999, 2100, 9999, u32::MAX] {
            assert_eq!(
                Expiry::new(1, year, TODAY),
                Err(ExpiryError::InvalidYear),
                "{year}"
            );
        }
    }

    #[test]
    fn fifty_years_ahead_is_accepted_and_fifty_one_rejected() {
        assert_eq!(Expiry::new(12, 2076, TODAY).expect("valid").year(), 2076);
        assert_eq!(Expiry::new(1, 2077, TODAY), Err(ExpiryError::InvalidYear));
        assert_eq!(Expiry::new(1, 77, TODAY), Err(ExpiryError::InvalidYear));
    }

    #[test]
    fn an_old_but_well_formed_year_is_expired_not_invalid() {
        assert_eq!(Expiry::new(1, 2000, TODAY), Err(ExpiryError::Expired));
        assert_eq!(Expiry::new(1, 0, TODAY), Err(ExpiryError::Expired));
    }

    #[test]
    fn an_invalid_month_is_reported_before_expiry() {
        assert_eq!(Expiry::new(13, 2020, TODAY), Err(ExpiryError::InvalidMonth));
    }
}
