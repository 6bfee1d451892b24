//! `uniffi-bindgen generate --library target/debug/libtern_ffi.so --language kotlin --out-dir DIR`
//! (see bindings/generate.sh). A crate of its own so that only this binary carries the generator.

fn main() {
    uniffi::uniffi_bindgen_main()
}
