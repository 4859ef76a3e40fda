"""The KVM probe names PVM, the paravirtual nested KVM that boots only PVM-guest kernels."""

from pathlib import Path

from agentbox_runtime.vmm import kvm_probe


def test_a_pvm_host_is_told_by_its_kvm_pvm_module(tmp_path: Path) -> None:
    module = tmp_path / "kvm_pvm"
    assert not kvm_probe.pvm_host(module)
    module.mkdir()
    assert kvm_probe.pvm_host(module)


def test_a_failed_probe_on_a_pvm_host_says_why() -> None:
    detail = "KVM boot did not reach the initramfs within 20s (kernel hangs under KVM)"
    said = kvm_probe.why_not(detail, pvm=True)
    assert said.startswith(detail)
    assert "PVM" in said and "CONFIG_PVM_GUEST" in said
    assert kvm_probe.why_not(detail, pvm=False) == detail
