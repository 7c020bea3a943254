"""InfU checkpoints in the released layout: save -> load bit-for-bit, the layouts we accept, the spec."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import FluxControlNetModel

from infu.model.config import ProjectionConfig
from infu.model.infu import InfU, resolve_version_dir
from infu.model.projection import PROJECTION_BIN, PROJECTION_CONFIG, PROJECTION_SAFETENSORS
from infu.model.tiny import tiny_transformer

pytestmark = pytest.mark.filterwarnings("ignore:.*FluxPosEmbed:FutureWarning")

PROJECTION = ProjectionConfig(
    dim=32, depth=2, dim_head=8, heads=4, num_queries=8, embedding_dim=128, output_dim=32
)
TOKENS = 16


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return tiny_transformer(
        num_layers=4, num_single_layers=8, joint_attention_dim=PROJECTION.output_dim
    ).eval()


@pytest.fixture(scope="module")
def trained_infu(transformer) -> InfU:
    """A fresh InfU whose zero-initialised outputs are made non-zero, as after training."""
    torch.manual_seed(1)
    infu = InfU.from_transformer(transformer, PROJECTION, factor=4).eval()
    with torch.no_grad():
        for name, parameter in infu.infusenet.named_parameters():
            if name.startswith("controlnet_"):
                parameter.normal_(std=0.05)
    return infu


def velocity(infu: InfU, transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    ids = torch.zeros(TOKENS, 3)
    ids[:, 1], ids[:, 2] = torch.arange(TOKENS) // 4, torch.arange(TOKENS) % 4
    with torch.no_grad():
        return infu(
            transformer,
            id_embedding=torch.nn.functional.normalize(torch.randn(2, 128, generator=generator), dim=-1),
            latents=torch.randn(2, TOKENS, 64, generator=generator),
            timestep=torch.tensor([0.3, 0.9]),
            prompt_embeds=torch.randn(2, 5, 32, generator=generator),
            pooled_prompt_embeds=torch.randn(2, 32, generator=generator),
            text_ids=torch.zeros(5, 3),
            img_ids=ids,
            control_latents=torch.randn(2, TOKENS, 64, generator=generator),
        )


def test_save_writes_the_released_layout(trained_infu, tmp_path):
    version_dir = trained_infu.save_pretrained(tmp_path / "InfiniteYou", "sim_stage1")
    assert version_dir == tmp_path / "InfiniteYou" / "infu_flux_v1.0" / "sim_stage1"
    root_config = json.loads((tmp_path / "InfiniteYou" / "config.json").read_text())
    assert root_config["_infu_flux_version"] == "1.0" and "_diffusers_version" in root_config
    for name in (PROJECTION_BIN, PROJECTION_SAFETENSORS, PROJECTION_CONFIG):
        assert (version_dir / name).is_file()
    infusenet_dir = version_dir / "InfuseNetModel"
    config = json.loads((infusenet_dir / "config.json").read_text())
    assert config["_class_name"] == "FluxControlNetModel"
    assert (config["num_layers"], config["num_single_layers"]) == (1, 2)
    assert list(infusenet_dir.glob("*.safetensors"))
    released = torch.load(version_dir / PROJECTION_BIN, weights_only=True)
    assert set(released) == {"image_proj"}
    assert json.loads((version_dir / PROJECTION_CONFIG).read_text())["embedding_space"] == "dlib"
    # What the release's own loader does with our folder: a plain FluxControlNetModel.
    plain = FluxControlNetModel.from_pretrained(infusenet_dir)
    for key, tensor in plain.state_dict().items():
        assert torch.equal(tensor, trained_infu.infusenet.state_dict()[key])


def test_save_then_load_reproduces_outputs_bit_for_bit(trained_infu, transformer, tmp_path):
    trained_infu.save_pretrained(tmp_path, "aes_stage2")
    reloaded = InfU.from_pretrained(tmp_path, "aes_stage2").eval()
    assert reloaded.projection.config.embedding_space == "dlib"
    assert torch.equal(velocity(reloaded, transformer), velocity(trained_infu, transformer))


def test_loads_the_released_bin_when_no_safetensors(trained_infu, transformer, tmp_path):
    version_dir = trained_infu.save_pretrained(tmp_path, "aes_stage2")
    (version_dir / PROJECTION_SAFETENSORS).unlink()
    (version_dir / PROJECTION_CONFIG).unlink()
    reloaded = InfU.from_pretrained(tmp_path, "aes_stage2", projection=PROJECTION).eval()
    assert torch.equal(velocity(reloaded, transformer), velocity(trained_infu, transformer))


def test_accepts_model_version_and_version_folders(trained_infu, tmp_path):
    version_dir = trained_infu.save_pretrained(tmp_path / "root", "sim_stage1")
    flat = tmp_path / "flat"
    shutil.copytree(version_dir, flat / "sim_stage1")
    assert resolve_version_dir(tmp_path / "root", "sim_stage1") == version_dir
    assert resolve_version_dir(flat, "sim_stage1") == flat / "sim_stage1"
    assert resolve_version_dir(flat / "sim_stage1", "anything") == flat / "sim_stage1"
    with pytest.raises(FileNotFoundError, match="aes_stage2"):
        resolve_version_dir(tmp_path / "root", "aes_stage2")


def test_projection_must_fit_the_transformer(transformer):
    with pytest.raises(ValueError, match="joint_attention_dim"):
        InfU.from_transformer(
            transformer, ProjectionConfig(embedding_dim=128, output_dim=64, dim=32, heads=2)
        )


def test_spec_layout_matches_the_shared_spec(shared_specs):
    spec = (shared_specs / "infu-checkpoint-format.md").read_text()
    for fact in ("image_proj_model.bin", "InfuseNetModel/", '"_infu_flux_version": "1.0"', "infu_flux_v1.0/"):
        assert fact in spec
