"""The snapshot template's key, command line, launch line and pruning (:mod:`agentbox_runtime.vmm.snapshot`)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest

from agentbox_guest_init import contract
from agentbox_guest_init.launch_config import LaunchConfig, LaunchDisk, decode
from agentbox_runtime.vmm import snapshot
from agentbox_runtime.vmm.qemu import QemuDriver


@pytest.fixture
def inputs(tmp_path: Path) -> snapshot.TemplateInputs:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel-1")
    return snapshot.TemplateInputs(image_rootfs=tmp_path / "root", image_digest="sha256:" + "a" * 64,
                                   guest_init=tmp_path / "root/nix/store/x/bin/agentbox-guest-init", kernel=kernel,
                                   ram_mib=2048, vcpus=2, accel="tcg")


def key(inputs: snapshot.TemplateInputs, base: str = "initramfs-6.1-abc.cpio", guest_init: str = "g1") -> str:
    return snapshot.template_key(inputs, Path(base), guest_init)


def test_every_input_is_part_of_the_key(inputs: snapshot.TemplateInputs, tmp_path: Path) -> None:
    first = key(inputs)
    assert key(inputs) == first, "the key is stable"
    changed = [key(replace(inputs, image_digest="sha256:" + "b" * 64)), key(inputs, guest_init="g2"),
               key(inputs, base="initramfs-6.1-def.cpio"), key(replace(inputs, ram_mib=4096)),
               key(replace(inputs, vcpus=1)), key(replace(inputs, accel="kvm")),
               key(replace(inputs, workspace_tag="other")), key(replace(inputs, rtc_base="2001-01-01"))]
    inputs.kernel.write_bytes(b"kernel-2")  # same path, new content
    changed.append(key(inputs))
    assert first not in changed and len(set(changed)) == len(changed)


def test_a_changed_qemu_binary_is_another_key(inputs: snapshot.TemplateInputs,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first = key(inputs)
    monkeypatch.setattr(snapshot, "qemu_identity", lambda: "/usr/bin/qemu-system-x86_64:1:2")
    assert key(inputs) != first


def test_a_kvm_template_is_keyed_by_the_host_cpu(inputs: snapshot.TemplateInputs,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    kvm = replace(inputs, accel="kvm")
    first, tcg = key(kvm), key(inputs)
    monkeypatch.setattr(snapshot, "host_cpu_identity", lambda: "another-cpu")
    assert key(kvm) != first and key(inputs) == tcg, "-cpu host ties a KVM template to this CPU; TCG's is max"


def template(inputs: snapshot.TemplateInputs, tmp_path: Path) -> snapshot.Template:
    return snapshot.Template(tmp_path / "snap" / "k1", inputs, "k1", tmp_path / "snap/root-x.img",
                             tmp_path / "vmlinux", (), tmp_path / "initramfs.cpio")


def devices(argv: list[str]) -> list[str]:
    """The command line with every per-guest path blanked."""
    return [re.sub(r"path=(?:[^,]|,,)*", "path=P", a) for a in argv]


def test_restore_runs_the_template_devices_with_its_own_paths(inputs: snapshot.TemplateInputs,
                                                              tmp_path: Path) -> None:
    t = template(inputs, tmp_path)
    saved = snapshot.machine_argv(t, tmp_path / "sock-template", tmp_path / "placeholder")
    restored = snapshot.restore_argv(t, tmp_path / "sock-guest", tmp_path / "workspace,with,commas")
    assert restored[-2:] == ["-incoming", f"exec:cat {t.state}"]
    assert devices(restored[:-2]) == devices(saved)
    assert "path=" + str(tmp_path / "workspace,,with,,commas") in ",".join(restored), "paths are quoted"
    assert f"{snapshot.SNAPSHOT_CMDLINE}" in restored and "agentbox.launch=port" in snapshot.SNAPSHOT_CMDLINE
    assert not any("virtio-blk" in a for a in saved), "the persistent disks are hot-added after a restore"


def test_each_launch_line_has_its_own_seed_and_the_host_clock(tmp_path: Path) -> None:
    cfg = LaunchConfig(task_rootfs="/r", workspace_source="/w", workspace_tag=contract.WORKSPACE_TAG,
                       workspace_target="/workspace", ram_mib=1024, vcpus=1, workdir="/", exec_path="/bin/sh",
                       disks=(LaunchDisk("agentbox-nix-disk-id-longer-than-20", "/d/nix.img"),), argv=("sh",))
    before = time.time_ns()
    a, b = (json.loads(snapshot.launch_line(cfg)) for _ in range(2))
    assert a["seed"] != b["seed"] and len(bytes.fromhex(a["seed"])) == snapshot.SEED_BYTES
    assert before <= a["time_ns"] <= time.time_ns()
    assert decode(a["launch"]) == cfg and a["disks"] == ["agentbox-nix-disk-id"]
    assert snapshot.launch_line(cfg).endswith(b"\n") and snapshot.launch_line(cfg).count(b"\n") == 1


def test_prune_removes_stale_templates_of_the_same_shape_only(inputs: snapshot.TemplateInputs,
                                                              tmp_path: Path) -> None:
    cache = tmp_path / "snap"
    keep = template(inputs, tmp_path)

    def made(name: str, ram: int, root: str) -> Path:
        d = cache / name
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"inputs": {"ram_mib": str(ram), "vcpus": "2", "accel": "tcg"},
                                                 "root_image": str(cache / root)}))
        (cache / root).write_text("img")
        return d

    keep.directory.mkdir(parents=True)
    keep.root_image.write_text("img")
    stale = made("stale", 2048, "root-old.img")
    other_shape = made("bigger", 4096, "root-big.img")
    (cache / "root-orphan.img").write_text("img")
    snapshot.prune(keep)
    assert not stale.exists() and other_shape.exists() and keep.directory.exists()
    assert sorted(p.name for p in cache.glob("root-*.img")) == ["root-big.img", "root-x.img"]


def test_a_template_that_cannot_be_built_means_a_cold_boot(inputs: snapshot.TemplateInputs,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    def no_template(*_args: object) -> snapshot.Template:
        raise snapshot.RestoreFailed("snapshot guest: no 'ready' within 300s; console: ...")

    booted: list[object] = []

    def cold_start(_driver: object, spec: object) -> str:
        booted.append(spec)
        return "cold-handle"

    monkeypatch.setattr(snapshot, "ensure", no_template)
    monkeypatch.setattr(QemuDriver, "available", lambda self: (True, "usable"))
    monkeypatch.setattr(QemuDriver, "start", cold_start)
    drv = snapshot.SnapshotDriver()
    monkeypatch.setattr(drv, "inputs", lambda spec: inputs)
    handle: object = drv.start("spec")  # type: ignore[arg-type]
    assert handle == "cold-handle"
    assert booted == ["spec"] and drv.fallback is not None and "no 'ready'" in drv.fallback
    assert "booting cold" in caplog.text


def test_a_template_that_failed_to_build_is_not_built_again(inputs: snapshot.TemplateInputs, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    t = template(inputs, tmp_path)
    builds: list[str] = []

    def failing_build(tpl: snapshot.Template) -> None:
        builds.append(tpl.key)
        raise snapshot.RestoreFailed("snapshot guest: qemu exited with status 1; console: oops")

    monkeypatch.setattr(snapshot, "prepare", lambda inputs, cache: t)
    monkeypatch.setattr(snapshot, "build", failing_build)
    with pytest.raises(snapshot.RestoreFailed, match="oops"):
        snapshot.ensure(inputs, tmp_path / "snap")
    with pytest.raises(snapshot.RestoreFailed, match=f"failed to build before .*oops.*remove {t.directory}"):
        snapshot.ensure(inputs, tmp_path / "snap")
    assert builds == ["k1"]
