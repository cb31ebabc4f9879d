//! Config parsing: any text either parses to a config that validates and
//! survives a TOML round trip unchanged, or is refused with an error; it
//! never panics.
#![no_main]

use std::path::Path;

use instance_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let Ok(config) = Config::parse(text, path) else {
        return;
    };
    config.validate(path).expect("a parsed config validates again");
    let written = toml::to_string(&config).expect("a config serialises");
    let reparsed = Config::parse(&written, path).expect("a written config parses");
    assert_eq!(config, reparsed, "TOML round trip changed the config");
});
