//! `Dsn::parse` never panics; what it accepts shows no password and parses back to the
//! same display; the reach check over it never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(dsn) = flotilla::dsn::Dsn::parse(text) else { return };
    let shown = dsn.to_string();
    // The display is percent-encoded: a password with any other character can only
    // show up verbatim if the display leaked it (short ones may occur by chance).
    if let Some(pw) = dsn.config().get_password() {
        let pw = String::from_utf8_lossy(pw);
        let displayable =
            |c: char| c.is_ascii_alphanumeric() || "-_.~%:@/[]".contains(c);
        if pw.chars().count() >= 4 && pw.chars().any(|c| !displayable(c)) {
            assert!(!shown.contains(pw.as_ref()), "{shown}");
        }
    }
    let again = flotilla::dsn::Dsn::parse(&shown).expect("the display parses");
    assert_eq!(again.to_string(), shown);
    let _ = flotilla::reach::Reach::default().check(&dsn);
});
