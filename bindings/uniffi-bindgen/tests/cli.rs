//! The generator binary starts and offers `generate`. Being an integration test, it also makes
//! `cargo test --workspace` build the binary the bindings end-to-end tests run.

#[test]
fn the_generator_offers_generate() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .arg("--help")
        .output()
        .expect("running uniffi-bindgen");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("generate"), "{help}");
}
