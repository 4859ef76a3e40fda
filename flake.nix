{
  description = "agentbox-harness: run agent workspaces in real microVMs and verify them with pytest";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";
    # libkrun, libkrunfw and crun's krun handler come from a newer channel: the helper needs libkrun
    # >= 1.18.0 built with BLK=1 (docs/libkrun-fidelity.md, "Minimum versions"), which 24.05 lacks
    nixpkgs-krun.url = "github:NixOS/nixpkgs/nixos-25.11";
    # libkrun itself, pinned to the release the ledger reads (krun_add_virtiofs3 first appears there)
    libkrun-src = { url = "github:containers/libkrun/v1.18.0"; flake = false; };
    # the reference's crun fork: crun's krun handler plus the krun.disk.* annotations (krun.1.md)
    crun-krun-disk = {
      url = "git+https://github.com/zeroqn/crun?rev=9f20944b95c00a5642191ebf6cb1bd0a9a07faaf&submodules=1";
      flake = false;
    };
  };

  outputs = { self, nixpkgs, nixpkgs-krun, libkrun-src, crun-krun-disk }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system} system);
      version = "0.1.0";
    in {
      packages = forAll (pkgs: system:
        let
          krunPkgs = nixpkgs-krun.legacyPackages.${system};
          # libkrun 1.18.0 with block devices (krun_add_disk) and passt networking (crun's krun.use_passt);
          # Cargo.lock of the pinned source names every crate by checksum, so no vendor hash is needed
          libkrun = (krunPkgs.libkrun.override { withBlk = true; withNet = true; }).overrideAttrs (old: {
            version = "1.18.0";
            src = libkrun-src;
            cargoDeps = krunPkgs.rustPlatform.importCargoLock { lockFile = "${libkrun-src}/Cargo.lock"; };
          });
          py = pkgs.python311Packages;
          kernel = pkgs.linuxPackages.kernel;
          # the initramfs the qemu backend builds runs this busybox before any library is there
          staticBusybox = pkgs.pkgsStatic.busybox;
          # the reference's crun fork with its libkrun handler (+LIBKRUN) and krun.disk.*, what libkrun
          # mode (krun-podman) runs on, linked against the libkrun above
          crunKrun = krunPkgs.crun.overrideAttrs (old: {
            version = "${old.version}-krun-disk";
            src = crun-krun-disk;
            buildInputs = (old.buildInputs or [ ]) ++ [ libkrun ];
            configureFlags = (old.configureFlags or [ ]) ++ [ "--with-libkrun" ];
          });
          guestTools = with pkgs; [
            python311 podman crun runc conmon netavark aardvark-dns passt slirp4netns catatonit iptables
            shadow fuse-overlayfs btrfs-progs util-linux kmod nix fish bash iproute2 socat cacert procps
            e2fsprogs coreutils docker-compose git ripgrep jq curl less which gawk diffutils
          ];
          hostTools = with pkgs; [ podman buildah crun runc btrfs-progs util-linux fuse-overlayfs qemu_kvm ];

          # The harness: agentbox_runtime, agentbox_guest_init and the pytest plugin, with the
          # host tools on PATH of the agentbox command.
          harness = py.buildPythonApplication {
            pname = "agentbox-harness";
            inherit version;
            pyproject = true;
            src = ./.;
            build-system = [ py.setuptools ];
            dependencies = with py; [ pytest pexpect podman filelock libarchive-c ];
            makeWrapperArgs = [ "--prefix" "PATH" ":" (pkgs.lib.makeBinPath hostTools) ];
            doCheck = false;
          };

          # guest_init at a store path: the microvm contract wants exactly one
          # executable /nix/store/*/bin/agentbox-guest-init in the image.
          guestInit = pkgs.runCommand "agentbox-guest-init-${version}" { } ''
            mkdir -p $out/lib $out/bin $out/share/agentbox
            cp -r ${./agentbox_guest_init} $out/lib/agentbox_guest_init
            cp -r ${./agentbox_guest_init/wrappers} $out/share/agentbox/wrappers
            cp -r ${./agentbox_runtime/images/files} $out/share/agentbox/files
            cat > $out/bin/agentbox-guest-init <<PY
            #!${pkgs.python311}/bin/python3 -I
            import sys
            sys.path.insert(0, "$out/lib")
            from agentbox_guest_init.cli import main
            sys.exit(main())
            PY
            chmod 0755 $out/bin/agentbox-guest-init
          '';

          # The guest image with the same contract as `agentbox image build`, for an image user
          # like its --user/--uid/--gid/--workdir:
          #   image.override { user = "agent"; uid = 2000; gid = 2000; workdir = "/work"; }
          mkImage = { user ? "dev", uid ? 1000, gid ? 1000, workdir ? "/workspace" }:
            let home = "/home/${user}"; in
            pkgs.dockerTools.buildLayeredImage {
            name = "localhost/agentbox";
            tag = "latest";
            maxLayers = 10;
            contents = [ guestInit ] ++ guestTools;
            # /nix/var/nix/db registers every store path of the image: nix in the guest
            # (and the nix-daemon sidecar of container mode) can use and add to the store
            includeNixDB = true;
            # Same layout as `agentbox image build`: the stable /bin path, the
            # in-image wrappers (7.15) and sidecar scripts (8.3), the image user
            # (dev, uid/gid 1000, fish, by default) named in /etc/agentbox/image-user,
            # the nixbld group (gid 30000) and a kernel with its modules for the qemu backend.
            extraCommands = ''
              mkdir -p bin usr/local/bin tmp .${workdir} .${home} etc/agentbox boot lib nix/var/nix
              chmod 1777 tmp
              ln -sf ${guestInit}/bin/agentbox-guest-init bin/agentbox-guest-init
              # the wrappers name Debian's paths; point them at the store
              for w in ${guestInit}/share/agentbox/wrappers/*; do
                sed -e "s|/usr/bin/nix|${pkgs.nix}/bin/nix|g" \
                    -e "s|/usr/bin/docker-compose|${pkgs.docker-compose}/bin/docker-compose|g" \
                    -e "s|/usr/bin/podman|${pkgs.podman}/bin/podman|g" \
                    "$w" > "usr/local/bin/$(basename "$w")"
                chmod 0755 "usr/local/bin/$(basename "$w")"
              done
              for f in ${guestInit}/share/agentbox/files/*; do
                install -m 0755 "$f" bin/
              done
              # Real files, not /nix/store symlinks: the host reads the kernel, its modules and
              # busybox out of the unpacked image to build the initramfs, and would resolve an
              # absolute symlink against its own store.
              cp ${kernel}/bzImage boot/vmlinuz-${kernel.modDirVersion}
              cp -rL ${kernel}/lib/modules lib/modules
              rm -f bin/busybox
              cp ${staticBusybox}/bin/busybox bin/busybox
              chmod 0755 bin/busybox
              {
                echo "root:x:0:0:root:/root:${pkgs.bash}/bin/bash"
                echo "${user}:x:${toString uid}:${toString gid}::${home}:${pkgs.fish}/bin/fish"
                for i in 1 2 3 4 5 6 7 8; do
                  echo "nixbld$i:x:$((30000 + i)):30000:Nix build user $i:/var/empty:/sbin/nologin"
                done
              } > etc/passwd
              {
                echo "root:x:0:"
                echo "${user}:x:${toString gid}:"
                echo "nixbld:x:30000:nixbld1,nixbld2,nixbld3,nixbld4,nixbld5,nixbld6,nixbld7,nixbld8"
              } > etc/group
              printf 'user=%s\nuid=%s\ngid=%s\nworkdir=%s\n' ${user} ${toString uid} ${toString gid} ${workdir} \
                > etc/agentbox/image-user
            '';
            # the user's home and XDG base dirs, owned by it (the image contract)
            fakeRootCommands = ''
              mkdir -p .${home}/.config .${home}/.local/share .${home}/.local/state .${home}/.cache
              chown -R ${toString uid}:${toString gid} .${home}
            '';
            config = {
              Entrypoint = [ "/bin/agentbox-guest-init" "default" "enter" "--" ];
              Cmd = [ "fish" "-l" ];
              WorkingDir = workdir;
              Env = [
                "PATH=/usr/local/bin:/bin:${pkgs.lib.makeBinPath guestTools}"
                "SHELL=${pkgs.fish}/bin/fish"
                "AGENTBOX_REAL_PODMAN=${pkgs.podman}/bin/podman"
                "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
              ];
              Labels = {
                "io.agentbox.guest-init" = builtins.baseNameOf guestInit;
                "io.agentbox.user" = user;
                "io.agentbox.uid" = toString uid;
                "io.agentbox.gid" = toString gid;
                "io.agentbox.workdir" = workdir;
              };
            };
          };
          image = pkgs.lib.makeOverridable mkImage { };
        in {
          default = harness;
          inherit harness guestInit image;
          # what `agentbox doctor` points at when libkrun or crun's krun handler is missing
          inherit libkrun;
          libkrunfw = krunPkgs.libkrunfw;
          crun = crunKrun;
        });

      devShells = forAll (pkgs: _system: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            python311 python311Packages.pytest python311Packages.pytest-xdist
            python311Packages.pexpect python311Packages.pyfakefs
            podman buildah crun runc btrfs-progs util-linux fuse-overlayfs qemu_kvm
            debootstrap busybox nix
          ];
        };
      });
    };
}
