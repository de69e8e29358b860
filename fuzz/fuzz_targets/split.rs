//! The splitter never panics, and its pieces always re-join to the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else { return };
    match flotilla::bundle::sql::split(sql) {
        Ok(pieces) => {
            let joined: String = pieces.iter().map(|p| p.text(sql)).collect();
            assert_eq!(joined, sql);
            for p in &pieces {
                let _ = flotilla::bundle::rules::refused_in_transaction(&p.leading);
                let _ = flotilla::bundle::rules::concurrent_index(&p.leading);
            }
        }
        Err(e) => assert!(e.offset < sql.len()),
    }
});
