"""Loading official-layout checkpoints: the full-size key layout, and synthetic files through the real loader."""
import huggingface_hub
import pytest
import torch
from safetensors.torch import save_file

from mini_supir import supir, weights
from mini_supir.weights import CheckpointError, read_state_dict

SUPIR_PREFIXES = ("model.control_model.", "model.diffusion_model.project_modules.", "first_stage_model.denoise_encoder.")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny model saved as the two files users have: an SDXL single file and a SUPIR file."""
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in supir.build(supir.TINY, "cpu").state_dict().items()}
    d = tmp_path_factory.mktemp("ckpt")
    base = {k: v for k, v in sd.items() if not k.startswith(SUPIR_PREFIXES)}
    base["denoiser.sigmas"] = torch.ones(1000)  # present in real SDXL files, owned by no module
    save_file(base, str(d / "sdxl.safetensors"))
    torch.save({"state_dict": {k: v for k, v in sd.items() if k.startswith(SUPIR_PREFIXES)} | {"mask_LQ": torch.ones(1)}},
               d / "supir.ckpt")
    return d, sd


def test_synthetic_checkpoint_loads_strictly(tiny_files):
    d, sd = tiny_files
    model = supir.load(supir.TINY, d / "sdxl.safetensors", d / "supir.ckpt")
    ours = model.state_dict()
    assert set(ours) == set(sd)
    assert all(torch.equal(ours[k], sd[k]) for k in sd)


def test_dtype_per_component(tiny_files):
    d, _ = tiny_files
    model = supir.load(supir.TINY, d / "sdxl.safetensors", d / "supir.ckpt", dtypes={"model.": torch.bfloat16})
    assert model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert model.first_stage_model.quant_conv.weight.dtype == torch.float32


def test_truncated_file_is_one_clear_error(tiny_files, tmp_path):
    d, _ = tiny_files
    data = (d / "sdxl.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        supir.load(supir.TINY, tmp_path / "cut.safetensors", d / "supir.ckpt")


def test_missing_and_misshaped_keys_are_listed(tiny_files, tmp_path):
    d, _ = tiny_files
    base = read_state_dict(d / "sdxl.safetensors")
    del base["model.diffusion_model.out.2.bias"]
    base["first_stage_model.quant_conv.weight"] = torch.zeros(1, 2, 3, 4)
    save_file(base, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        supir.load(supir.TINY, tmp_path / "bad.safetensors", d / "supir.ckpt")
    msg = str(e.value)  # a wrong shape is blamed on the file that holds it, not on the SUPIR file read after it
    assert msg.startswith(f"{tmp_path / 'bad.safetensors'} does not fit the model: 1 wrongly shaped: "
                          "first_stage_model.quant_conv.weight (1, 2, 3, 4) != (8, 8, 1, 1)")
    assert "\n" not in msg
    del base["first_stage_model.quant_conv.weight"]
    save_file(base, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        supir.load(supir.TINY, tmp_path / "bad.safetensors", d / "supir.ckpt")
    assert str(e.value).startswith(f"{tmp_path / 'bad.safetensors'} does not fit the model: 2 missing: "
                                   "model.diffusion_model.out.2.bias, first_stage_model.quant_conv.weight")


def test_files_are_named_all_at_once_before_any_download(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.delenv("MINI_SUPIR_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("a download was tried"))
    with pytest.raises(weights.WeightsError) as e:
        weights.resolve_all(["sdxl", str(tmp_path / "a.safetensors"), str(tmp_path / "b.pt")])
    assert e.value.args[0] == f"{tmp_path / 'a.safetensors'}, {tmp_path / 'b.pt'}"
    assert "no such file" in e.value.args[1]
    monkeypatch.undo()
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setenv("MINI_SUPIR_OFFLINE", "1")
    with pytest.raises(weights.WeightsError) as e:  # offline: every registry file not here, with where it goes
        weights.resolve_all(["sdxl", "Q"])
    assert e.value.args[0] == "sdxl, Q"
    assert f"put it at {tmp_path / 'sd_xl_base_1.0_0.9vae.safetensors'}" in e.value.args[1]
    assert f"put it at {tmp_path / 'SUPIR-v0Q_fp16.safetensors'}" in e.value.args[1]


def test_sdxl_file_is_not_a_supir_file(tiny_files):
    d, _ = tiny_files
    with pytest.raises(CheckpointError, match="not a SUPIR checkpoint"):
        supir.load(supir.TINY, d / "sdxl.safetensors", d / "sdxl.safetensors")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        supir.load(supir.TINY, tmp_path / "nope.safetensors")


def test_file_without_clip_position_ids_loads(tiny_files, tmp_path):
    d, sd = tiny_files
    base = read_state_dict(d / "sdxl.safetensors")
    del base["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"]
    save_file(base, str(tmp_path / "nopos.safetensors"))
    model = supir.load(supir.TINY, tmp_path / "nopos.safetensors", d / "supir.ckpt")
    ids = model.conditioner.embedders[0].transformer.text_model.embeddings.position_ids
    assert torch.equal(ids, torch.arange(77)[None])
