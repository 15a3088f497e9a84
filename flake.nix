{
  description = "aws-pgbouncer: keeps a stock PgBouncer supplied with fresh RDS IAM tokens";

  # nix build .#                  the daemon, built from Cargo.lock
  # nix build .#image             a layered OCI image (docker load < result)
  # nix build .#image-supervised  the same with PgBouncer, for `run --supervise`
  # nix run . -- run --help       the daemon
  # nix develop                   Rust toolchain, PgBouncer, PostgreSQL, Python with botocore
  #
  # The AWS SDK crates in Cargo.lock need rustc >= 1.94.1, hence nixpkgs unstable until a
  # release branch has it; the package asserts it. The first `nix flake lock` pins nixpkgs
  # and the RDS CA bundle (a file input, so its hash lands in flake.lock).
  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    rds-ca-bundle = {
      url = "file+https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem";
      flake = false;
    };
  };

  outputs = { self, nixpkgs, rds-ca-bundle }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);
      version = cargoToml.package.version;
      minRustc = "1.94.1";
      minPgbouncer = "1.24";

      # uid/gid of the images' user, as in container/Dockerfile (distroless's nonroot).
      uid = "65532";
      caPath = "/etc/ssl/rds/global-bundle.pem";
      dir = "/run/aws-pgbouncer";

      packageFor = pkgs:
        assert pkgs.lib.assertMsg (pkgs.lib.versionAtLeast pkgs.rustc.version minRustc)
          "aws-pgbouncer needs rustc >= ${minRustc} (the AWS SDK crates); nixpkgs has ${pkgs.rustc.version}";
        pkgs.rustPlatform.buildRustPackage {
          pname = cargoToml.package.name;
          inherit version;
          # Only what the package needs (Cargo.toml names the benchmark, so benches/ too).
          src = pkgs.lib.fileset.toSource {
            root = ./.;
            fileset = pkgs.lib.fileset.unions [ ./Cargo.toml ./Cargo.lock ./build.rs ./src ./benches ];
          };
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = [ "--bin" "aws-pgbouncer" ];
          # The unit tests only: the integration tests need PostgreSQL, PgBouncer and the RDS
          # stand-in (scripts/provision.sh), which the build sandbox does not have.
          cargoTestFlags = [ "--lib" ];
          meta = {
            description = cargoToml.package.description;
            license = pkgs.lib.licenses.asl20;
            mainProgram = "aws-pgbouncer";
            platforms = pkgs.lib.platforms.linux;
          };
        };

      pgbouncerFor = pkgs:
        assert pkgs.lib.assertMsg (pkgs.lib.versionAtLeast pkgs.pgbouncer.version minPgbouncer)
          "PgBouncer >= ${minPgbouncer} keeps server connections across RELOAD; nixpkgs has ${pkgs.pgbouncer.version}";
        pkgs.pgbouncer;

      imageFor = pkgs: { name, supervised }:
        let
          package = packageFor pkgs;
          pgbouncer = pgbouncerFor pkgs;
        in
        pkgs.dockerTools.buildLayeredImage {
          inherit name;
          tag = version;
          contents = [ package ] ++ pkgs.lib.optional supervised pgbouncer;
          extraCommands = ''
            mkdir -p etc/ssl/rds run tmp
            cp ${rds-ca-bundle} etc/ssl/rds/global-bundle.pem
            chmod 0644 etc/ssl/rds/global-bundle.pem
            chmod 1777 tmp
            echo 'nonroot:x:${uid}:${uid}:nonroot:/nonexistent:/sbin/nologin' > etc/passwd
            echo 'nonroot:x:${uid}:' > etc/group
          '';
          # The daemon's directory, owned by the image's user.
          fakeRootCommands = ''
            mkdir -p .${dir}
            chown ${uid}:${uid} .${dir}
            chmod 0700 .${dir}
          '';
          config = {
            Entrypoint = [ "${package}/bin/aws-pgbouncer" ];
            Cmd = [ "run" ];
            User = "${uid}:${uid}";
            Env = [
              "AWS_PGBOUNCER_SERVER_CA_FILE=${caPath}"
              "AWS_PGBOUNCER_PGBOUNCER_DIR=${dir}"
            ] ++ pkgs.lib.optionals supervised [
              "AWS_PGBOUNCER_PGBOUNCER_BIN=${pgbouncer}/bin/pgbouncer"
              "AWS_PGBOUNCER_SUPERVISE=true"
            ];
            ExposedPorts = {
              "6432/tcp" = { };
              "9090/tcp" = { };
            };
          };
        };
    in
    {
      packages = forAllSystems (pkgs: rec {
        aws-pgbouncer = packageFor pkgs;
        default = aws-pgbouncer;
        image = imageFor pkgs { name = "aws-pgbouncer"; supervised = false; };
        image-supervised = imageFor pkgs { name = "aws-pgbouncer-supervised"; supervised = true; };
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = "${packageFor pkgs}/bin/aws-pgbouncer";
        };
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.rustc
            pkgs.cargo
            pkgs.clippy
            pkgs.rustfmt
            pkgs.rust-analyzer
            (pgbouncerFor pkgs)
            pkgs.postgresql
            (pkgs.python3.withPackages (ps: [ ps.botocore ps.moto ]))
            pkgs.openssl
          ];
          # The test harness looks for its test bed (scripts/provision.sh); in this shell the
          # tools come from Nix, but the RDS stand-in's PAM service still needs that script.
          RUST_BACKTRACE = "1";
        };
      });

      checks = forAllSystems (pkgs: {
        package = packageFor pkgs;
      });
    };
}
