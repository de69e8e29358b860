//! Any bytes under any name give a bundle or a clear error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (String, Vec<u8>)| {
    let (name, content) = input;
    let _ = flotilla::bundle::Bundle::from_files(
        vec![flotilla::bundle::BundleFile { name, content }],
        "fuzz",
    );
});
