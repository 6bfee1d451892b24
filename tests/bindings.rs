//! The app bindings for real: uniffi generates Python, Kotlin and Swift from the built tern-ffi
//! library, then the Python suite runs under pytest and a Kotlin program on the JVM, both
//! against that library; the Swift example is checked against the generated Swift API.
//!
//! Needs a JDK, JNA (`/usr/share/java/jna.jar`, Debian `libjna-java`; or `$TERN_JNA_JAR`) and
//! npm for the Kotlin compiler (or `$TERN_KOTLINC`); `.ci/run` installs them.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::{binary, python, repo};

/// Generated sources (and the library beside them), made once per test binary.
struct Generated {
    dir: PathBuf,
}

fn library() -> PathBuf {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    // Built as tern-e2e's dependency: cargo writes every crate type of a dependency to deps/.
    binary(&format!("deps/{DLL_PREFIX}tern_ffi{DLL_SUFFIX}"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

fn generated() -> &'static Generated {
    static GENERATED: OnceLock<Generated> = OnceLock::new();
    GENERATED.get_or_init(|| {
        let dir = binary("").join("tern-bindings");
        let _ = std::fs::remove_dir_all(&dir);
        let lib = library();
        for lang in ["python", "kotlin", "swift"] {
            run(
                Command::new(binary("uniffi-bindgen"))
                    .args(["generate", "--library"])
                    .arg(&lib)
                    .args(["--language", lang, "--out-dir"])
                    .arg(dir.join(lang))
                    .arg("--no-format")
                    // Library mode reads bindings/ffi/uniffi.toml through `cargo metadata`.
                    .current_dir(repo()),
                &format!("uniffi-bindgen generate --language {lang}"),
            );
        }
        // Python loads the library from the module's folder, JNA from jna.library.path.
        for sub in ["python", "native"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
            std::fs::copy(&lib, dir.join(sub).join(lib.file_name().unwrap())).unwrap();
        }
        Generated { dir }
    })
}

#[test]
fn generation_produces_kotlin_swift_and_python_sources() {
    let g = generated();
    for file in [
        "python/tern.py",
        "kotlin/dev/tern/tern.kt",
        "swift/Tern.swift",
        "swift/ternFFI.h",
        "swift/ternFFI.modulemap",
    ] {
        let len = std::fs::metadata(g.dir.join(file))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(len > 100, "{file}: {len} bytes");
    }
}

#[test]
fn python_suite_passes_against_the_library() {
    let g = generated();
    run(
        Command::new(python())
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
            .arg(repo().join("bindings/python/tests"))
            .env("TERN_BINDINGS", g.dir.join("python"))
            .env("TERN_CLI", binary("tern")),
        "pytest bindings/python/tests",
    );
}

fn kotlinc() -> PathBuf {
    if let Some(k) = std::env::var_os("TERN_KOTLINC") {
        return PathBuf::from(k);
    }
    // JetBrains' compiler from the npm registry; Debian's kotlin (1.3) cannot compile uniffi's
    // output. Installed once under the target directory.
    let prefix = binary("").join("kotlin-compiler");
    let kotlinc = prefix.join("node_modules/kotlin-compiler/bin/kotlinc");
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if !kotlinc.exists() {
        run(
            Command::new("npm")
                .args(["install", "--silent", "--no-save", "--prefix"])
                .arg(&prefix)
                .arg("kotlin-compiler@2.4.20"),
            "npm install kotlin-compiler (needs npm and the npm registry)",
        );
    }
    kotlinc
}

#[test]
fn kotlin_program_passes_on_the_jvm() {
    let g = generated();
    let jna = std::env::var_os("TERN_JNA_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/jna.jar"));
    assert!(
        jna.exists(),
        "{} is missing: install Debian's libjna-java or set TERN_JNA_JAR",
        jna.display()
    );
    let work = binary("").join("tern-bindings-kotlin");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let tern = binary("tern");
    run(
        Command::new(&tern)
            .arg("keygen")
            .arg("--out")
            .arg(work.join("fleet.key")),
        "tern keygen",
    );
    run(
        Command::new(&tern)
            .arg("sign")
            .arg(repo().join("models/digits-int8-qdq/1/model.onnx"))
            .args(["--model", "digits", "--version", "3", "--key"])
            .arg(work.join("fleet.key"))
            .arg("--out-dir")
            .arg(work.join("signed")),
        "tern sign",
    );
    let jar = work.join("tern-test.jar");
    run(
        Command::new(kotlinc())
            .args(["-nowarn", "-include-runtime", "-cp"])
            .arg(&jna)
            .arg("-d")
            .arg(&jar)
            .arg(g.dir.join("kotlin/dev/tern/tern.kt"))
            .arg(repo().join("bindings/kotlin/TernTest.kt")),
        "kotlinc",
    );
    let classpath = std::env::join_paths([&jar, &jna]).unwrap();
    let out = run(
        Command::new("java")
            .arg(format!(
                "-Djna.library.path={}",
                g.dir.join("native").display()
            ))
            .arg("-cp")
            .arg(classpath)
            .arg("dev.tern.test.TernTestKt")
            .arg(repo().join("models"))
            .arg(work.join("fleet.pub"))
            .arg(work.join("signed")),
        "the Kotlin test program",
    );
    assert!(out.contains("kotlin: all checks passed"), "{out}");
}

/// Swift has no compiler on Linux: instead, every API name the example calls must exist in the
/// generated Swift, so the README's iOS example cannot drift from the bindings.
#[test]
fn swift_example_uses_only_generated_names() {
    let g = generated();
    let api = std::fs::read_to_string(g.dir.join("swift/Tern.swift")).unwrap();
    let example = std::fs::read_to_string(repo().join("bindings/swift/Example.swift")).unwrap();
    let names = swift_api_names(&example);
    assert!(names.len() > 10, "too few names found: {names:?}");
    let missing: Vec<&String> = names.iter().filter(|n| !declared(&api, n)).collect();
    assert!(
        missing.is_empty(),
        "Example.swift uses names the generated Tern.swift lacks: {missing:?}"
    );
}

/// Names in the example that must come from the Tern module: called functions and types,
/// members after a `.`, argument labels. Comments, string literals and the Swift and Foundation
/// names the example uses are skipped.
fn swift_api_names(example: &str) -> Vec<String> {
    const SWIFT: &[&str] = &[
        "Array",
        "Data",
        "Double",
        "Float",
        "Int",
        "String",
        "UInt32",
        "UInt64",
        "URL",
        "FileManager",
        "DispatchQueue",
        "Bundle",
        "print",
        "fatalError",
        "append",
        "count",
        "map",
        "enumerated",
        "max",
        "by",
        "withUnsafeBytes",
        "load",
        "as",
        "self",
        "contentsOf",
        "concurrentPerform",
        "iterations",
        "default",
        "url",
        "forResource",
        "withExtension",
        "copyBytes",
        "to",
        "bindMemory",
        "first",
        "offset",
        "element",
        "urls",
        "for",
        "in",
        "userDomainMask",
        "documentDirectory",
        "appendingPathComponent",
        "path",
        "localizedDescription",
        "init",
        "repeating",
        "stride",
        "from",
        "through",
    ];
    let mut code = String::new();
    for line in example.lines() {
        let line = line.split("//").next().unwrap_or("");
        if line.trim_start().starts_with("import ") {
            continue;
        }
        // Drop string literals.
        let mut in_string = false;
        for c in line.chars() {
            if c == '"' {
                in_string = !in_string;
            } else if !in_string {
                code.push(c);
            }
        }
        code.push('\n');
    }
    let chars: Vec<char> = code.chars().collect();
    let own = swift_own_names(&code);
    let mut names = vec![];
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_alphabetic() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let before = start.checked_sub(1).map(|j| chars[j]);
            let after = chars.get(i).copied();
            let wanted = before == Some('.')
                || after == Some('(')
                || (after == Some(':') && chars.get(i + 1) != Some(&':'))
                || word.starts_with(char::is_uppercase);
            if wanted
                && !SWIFT.contains(&word.as_str())
                && !is_keyword(&word)
                && !own.contains(&word)
            {
                names.push(word);
            }
        } else {
            i += 1;
        }
    }
    names.sort();
    names.dedup();
    names
}

/// What the example declares itself: function names, their parameters, `let`/`var` names.
fn swift_own_names(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut own = vec![];
    for keyword in ["let ", "var "] {
        for piece in code.split(keyword).skip(1) {
            own.push(ident(piece));
        }
    }
    for piece in code.split("func ").skip(1) {
        own.push(ident(piece));
        let params = piece
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(") "))
            .map_or("", |(params, _)| params);
        for p in params.split(',') {
            // `label name: Type` or `name: Type`: both words are the example's own.
            if let Some((names, _)) = p.split_once(':') {
                own.extend(names.split_whitespace().map(ident));
            }
        }
    }
    own.retain(|n| !n.is_empty());
    own
}

fn is_keyword(w: &str) -> bool {
    matches!(
        w,
        "let"
            | "var"
            | "try"
            | "catch"
            | "do"
            | "func"
            | "return"
            | "if"
            | "else"
            | "guard"
            | "import"
            | "throws"
            | "case"
            | "switch"
            | "true"
            | "false"
            | "nil"
            | "where"
            | "Tern"
            | "Self"
            | "Error"
            | "Void"
            | "Bool"
    )
}

fn declared(api: &str, name: &str) -> bool {
    [
        format!("func {name}("),
        format!("func `{name}`("),
        format!("class {name}"),
        format!("struct {name}"),
        format!("enum {name}"),
        format!("case {name}"),
        format!("var {name}:"),
        format!("({name}: "),
        format!(", {name}: "),
        format!("\n        {name}: "),
    ]
    .iter()
    .any(|pattern| api.contains(pattern.as_str()))
}
