//! The image recipes hold: `flake.nix` parses (`nix-instantiate --parse`, required) and the
//! Dockerfiles pin their bases, copy only what exists and passes the build-context filter, and
//! set up the images as the daemon expects. Nothing is built.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use support::packaging::{env_vars_in, help_of, read, repo};

// ----------------------------------------------------------------------------- Nix

#[test]
fn flake_parses() {
    let output = Command::new("nix-instantiate")
        .args(["--parse", repo("flake.nix").to_str().unwrap()])
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "nix-instantiate is missing ({error}): install Debian's `nix-bin` package \
                 (scripts/provision.sh)"
            )
        });
    assert!(
        output.status.success(),
        "flake.nix does not parse: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = read("flake.nix");
    assert!(text.contains("cargoLock.lockFile = ./Cargo.lock;"));
    assert!(text.contains("dockerTools.buildLayeredImage"));
    let (_, vars) = help_of("run");
    for var in env_vars_in(&text) {
        assert!(vars.contains(&var), "flake.nix: {var} is not in run --help");
    }
}

// ----------------------------------------------------------------------- Dockerfiles

struct Instruction {
    keyword: String,
    args: String,
}

/// The instructions of a Dockerfile, continuation lines joined, comments dropped.
fn instructions(path: &str) -> Vec<Instruction> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in read(path).lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .into_iter()
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (keyword, args) = line.split_once(' ').unwrap_or((&line, ""));
            Instruction {
                keyword: keyword.to_uppercase(),
                args: args.trim().to_owned(),
            }
        })
        .collect()
}

/// `*` then `!path` lines: what the build context keeps.
fn context_keeps(ignore_file: &str, source: &str) -> bool {
    let text = read(ignore_file);
    let rules: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    assert_eq!(
        rules.first(),
        Some(&"*"),
        "{ignore_file}: expected `*` first"
    );
    rules[1..].iter().any(|rule| {
        let kept = rule.strip_prefix('!').expect("only ! rules after *");
        let kept = kept.trim_end_matches('/');
        source == kept || source.starts_with(&format!("{kept}/"))
    })
}

fn check_dockerfile(path: &str) -> Vec<Instruction> {
    let all = instructions(path);
    let ignore = format!("{path}.dockerignore");
    let mut args = std::collections::BTreeMap::new();
    let mut stages = BTreeSet::new();
    for instruction in &all {
        let words: Vec<&str> = instruction.args.split_whitespace().collect();
        match instruction.keyword.as_str() {
            "ARG" if stages.is_empty() => {
                if let Some((name, value)) = instruction.args.split_once('=') {
                    args.insert(name.to_owned(), value.to_owned());
                }
            }
            "FROM" => {
                let mut image = words
                    .iter()
                    .find(|word| !word.starts_with("--"))
                    .unwrap()
                    .to_string();
                if let Some(name) = image
                    .strip_prefix("${")
                    .and_then(|rest| rest.strip_suffix('}'))
                {
                    image = args
                        .get(name)
                        .unwrap_or_else(|| panic!("{path}: ARG {name} has no default"))
                        .clone();
                }
                if !stages.contains(&image) {
                    let tag = image.rsplit('/').next().unwrap().split_once(':');
                    assert!(
                        tag.is_some_and(|(_, tag)| !tag.is_empty() && tag != "latest"),
                        "{path}: FROM {image} is not pinned to a tag"
                    );
                }
                if let Some(at) = words
                    .iter()
                    .position(|word| word.eq_ignore_ascii_case("AS"))
                {
                    stages.insert(words[at + 1].to_owned());
                }
            }
            "COPY" => {
                let from = words.iter().find_map(|word| word.strip_prefix("--from="));
                let operands: Vec<&str> = words
                    .iter()
                    .copied()
                    .filter(|word| !word.starts_with("--"))
                    .collect();
                let sources = &operands[..operands.len() - 1];
                match from {
                    Some(stage) => assert!(
                        stages.contains(stage),
                        "{path}: COPY --from={stage} names no earlier stage"
                    ),
                    None => {
                        for source in sources {
                            let source = source.trim_start_matches("./").trim_end_matches('/');
                            assert!(
                                repo(source).exists(),
                                "{path}: COPY {source}: not in the repository"
                            );
                            assert!(
                                context_keeps(&ignore, source),
                                "{path}: COPY {source} is filtered out by {ignore}"
                            );
                        }
                    }
                }
            }
            _ => {}
        }
    }
    all
}

/// The instructions of one stage (from its FROM to the next).
fn stage<'a>(all: &'a [Instruction], name: &str) -> &'a [Instruction] {
    let start = all
        .iter()
        .position(|i| i.keyword == "FROM" && i.args.ends_with(&format!(" AS {name}")))
        .unwrap_or_else(|| panic!("no stage {name}"));
    let end = all[start + 1..]
        .iter()
        .position(|i| i.keyword == "FROM")
        .map_or(all.len(), |offset| start + 1 + offset);
    &all[start..end]
}

#[test]
fn dockerfiles_pin_their_bases_and_copy_what_exists() {
    let all = check_dockerfile("container/Dockerfile");
    let (flags, vars) = help_of("run");
    let build = stage(&all, "build");
    assert!(
        build
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("cargo build --release --locked")),
        "the build must use Cargo.lock as it is"
    );
    assert!(
        all.iter().any(|i| i.keyword == "ARG"
            && i.args
                == "RDS_CA_BUNDLE_URL=https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"),
        "the RDS CA bundle's address"
    );
    assert!(
        build.iter().any(|i| i.keyword == "ADD"
            && i.args
                .contains("${RDS_CA_BUNDLE_URL} /out/etc/ssl/rds/global-bundle.pem")),
        "the RDS CA bundle is fetched at build time"
    );
    assert!(flags.contains("--supervise") && vars.contains("AWS_PGBOUNCER_MODE"));
    for name in ["runtime", "supervised"] {
        let instructions = stage(&all, name);
        let find = |keyword: &str| -> Vec<&str> {
            instructions
                .iter()
                .filter(|i| i.keyword == keyword)
                .map(|i| i.args.as_str())
                .collect()
        };
        assert_eq!(
            find("ENTRYPOINT"),
            vec![r#"["/usr/local/bin/aws-pgbouncer"]"#],
            "{name}"
        );
        assert_eq!(find("CMD"), vec![r#"["run"]"#], "{name}");
        let user = find("USER");
        let user = user.last().expect("a USER");
        assert!(
            !user.starts_with('0') && !user.starts_with("root"),
            "{name}: {user}"
        );
        assert!(
            find("COPY")
                .iter()
                .any(|copy| copy.ends_with(" /usr/local/bin/aws-pgbouncer")),
            "{name}"
        );
        assert!(
            find("COPY")
                .iter()
                .any(|copy| copy.ends_with(" /etc/ssl/rds/global-bundle.pem")),
            "{name}"
        );
        let env = find("ENV").join(" ");
        assert!(
            env.contains("AWS_PGBOUNCER_SERVER_CA_FILE=/etc/ssl/rds/global-bundle.pem")
                && env.contains("AWS_PGBOUNCER_PGBOUNCER_DIR=/run/aws-pgbouncer"),
            "{name}: {env}"
        );
        for var in env_vars_in(&env) {
            assert!(vars.contains(&var), "{name}: {var} is not in run --help");
        }
    }
    let supervised = stage(&all, "supervised");
    assert!(supervised[0].args.starts_with("debian:trixie"));
    assert!(
        supervised
            .iter()
            .any(|i| i.keyword == "RUN" && i.args.contains("pgbouncer --version")),
        "the supervised image proves its PgBouncer version at build time"
    );
    // The default build takes PgBouncer's release tarball, so it must work without build
    // arguments: a pinned version with its checksum, which the stage checks.
    let default_of = |name: &str| {
        all.iter()
            .find_map(|i| {
                (i.keyword == "ARG")
                    .then(|| i.args.strip_prefix(&format!("{name}=")))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("ARG {name} has no default"))
    };
    assert_eq!(default_of("PGBOUNCER_FROM"), "release");
    assert_eq!(default_of("PGBOUNCER_VERSION"), "1.26.1");
    let checksum = default_of("PGBOUNCER_SHA256");
    assert!(
        checksum.len() == 64 && checksum.bytes().all(|b| b.is_ascii_hexdigit()),
        "PGBOUNCER_SHA256 must default to a SHA-256, not {checksum:?}"
    );
    assert!(
        stage(&all, "pgbouncer").iter().any(|i| i.keyword == "RUN"
            && i.args
                .contains(r#"echo "$PGBOUNCER_SHA256  pgbouncer.tar.gz" | sha256sum -c -"#)),
        "the release tarball is checked against PGBOUNCER_SHA256"
    );
    assert!(flags.contains("--supervise"));

    let standin = check_dockerfile("container/standin/Dockerfile");
    let entrypoint = standin
        .iter()
        .rfind(|i| i.keyword == "ENTRYPOINT")
        .expect("the stand-in's entrypoint");
    assert!(entrypoint.args.contains("standin-entrypoint"));
    // The stand-in runs what the test bed runs.
    for source in [
        "tests/standin/pam_standin.c",
        "tests/standin/verifier.py",
        "scripts/standin",
        "sql",
        "container/standin/entrypoint.sh",
    ] {
        assert!(
            standin
                .iter()
                .any(|i| i.keyword == "COPY" && i.args.split_whitespace().any(|w| w == source)),
            "the stand-in image lacks {source}"
        );
    }
    // Its test-bed variable is scripts/standin's, not the daemon's.
    let text = read("container/standin/Dockerfile");
    for var in env_vars_in(&text) {
        assert!(
            var == "AWS_PGBOUNCER_TESTBED" || vars.contains(&var),
            "container/standin/Dockerfile: {var}"
        );
    }
    assert!(read("scripts/standin").contains("AWS_PGBOUNCER_TESTBED"));
}
