{
  description = "agentbox-harness: run agent workspaces in real microVMs and verify them with pytest";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      version = "0.1.0";
    in {
      packages = forAll (pkgs:
        let
          py = pkgs.python311Packages;
          hostTools = with pkgs; [ podman buildah crun runc btrfs-progs util-linux fuse-overlayfs qemu_kvm ];

          # The harness: runtime, guest_init and the pytest plugin, with the
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
            mkdir -p $out/lib $out/bin
            cp -r ${./guest_init} $out/lib/guest_init
            cat > $out/bin/agentbox-guest-init <<PY
            #!${pkgs.python311}/bin/python3 -I
            import sys
            sys.path.insert(0, "$out/lib")
            from guest_init.cli import main
            sys.exit(main())
            PY
            chmod 0755 $out/bin/agentbox-guest-init
          '';

          # The guest image with the same contract as `agentbox image build`.
          image = pkgs.dockerTools.buildLayeredImage {
            name = "localhost/agentbox";
            tag = "latest";
            maxLayers = 10;
            contents = with pkgs; [
              guestInit python311 podman crun runc conmon netavark aardvark-dns passt slirp4netns
              shadow fuse-overlayfs btrfs-progs util-linux kmod busybox nix fish bash iproute2 socat
              cacert
            ];
            extraCommands = ''
              mkdir -p bin tmp workspace home/dev
              chmod 1777 tmp
              ln -sf ${guestInit}/bin/agentbox-guest-init bin/agentbox-guest-init
            '';
            config = {
              Entrypoint = [ "/bin/agentbox-guest-init" "default" "enter" "--" ];
              Cmd = [ "fish" "-l" ];
              WorkingDir = "/workspace";
              Env = [ "SHELL=${pkgs.fish}/bin/fish" "AGENTBOX_REAL_PODMAN=${pkgs.podman}/bin/podman" ];
              Labels = { "io.agentbox.guest-init" = "nix"; };
            };
          };
        in {
          default = harness;
          inherit harness guestInit image;
        });

      devShells = forAll (pkgs: {
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
