"""Reading released .pth files safely, and loading all four released runs strictly into build_model."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from spotocc.config import get_config
from spotocc.engine.released_checkpoint import (
    ReleasedCheckpointError,
    UnsafeCheckpointError,
    load_released_checkpoint,
    read_released_checkpoint,
)
from spotocc.models import build_model

# the pickle global numpy scalars reduce to: numpy.core.multiarray.scalar (numpy 1), numpy._core.* (2)
NUMPY_SCALAR = f"{np.int64(0).__reduce__()[0].__module__}.scalar"


def _load_layout():
    name = "spotocc_tests_released_layout"
    if name not in sys.modules:
        path = Path(__file__).parents[1] / "data" / "released_parameters" / "released_layout.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


rl = _load_layout()

# --------------------------------------------------------------------------------------------------
# safe reading


class _WritesMarker:
    """Unpickling this runs code: ``exec`` creates the marker file (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def tiny_state() -> OrderedDict[str, torch.Tensor]:
    return OrderedDict(
        [("img_neck.deblocks.0.1.weight", torch.arange(4.0)), ("img_neck.deblocks.0.1.bias", torch.ones(4))]
    )


def test_code_in_the_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save(rl.mmcv_checkpoint(tiny_state(), hook_msgs=_WritesMarker(marker)), path)
    for allow_numpy in (False, True):  # the numpy allow-list does not open the door either
        with pytest.raises(UnsafeCheckpointError) as info:
            read_released_checkpoint(path, allow_numpy=allow_numpy)
        assert not marker.exists()
        assert info.value.globals_needed == ["builtins.exec"]
        message = str(info.value)
        assert "builtins.exec" in message and "--allow-unsafe-pickle" in message
        assert "EXECUTES ANY CODE" in message and "--allow-numpy-pickle" not in message


def test_unsafe_pickle_opt_in_really_runs_the_files_code(tmp_path):
    """The opt-in is what it says: full pickle (shown with a harmless payload)."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save(rl.mmcv_checkpoint(tiny_state(), hook_msgs=_WritesMarker(marker)), path)
    with pytest.warns(UserWarning, match="any code in the file runs"):
        ckpt = read_released_checkpoint(path, allow_unsafe_pickle=True)
    assert marker.exists()
    assert torch.equal(ckpt.state_dict["img_neck.deblocks.0.1.weight"], torch.arange(4.0))


def fake_release_with_numpy_meta(path: Path, *, zip_format: bool = True) -> OrderedDict:
    """A released-style .pth whose mmcv ``meta`` holds numpy scalars and arrays; returns its state dict."""
    state = tiny_state()
    meta = {
        "mmcv_version": "1.4.0",
        "epoch": np.int64(24),
        "hook_msgs": {"best_score": np.float64(0.1372)},
        "mean": np.arange(3.0),
        "empty_boxes": np.zeros((0, 7), dtype=np.float32),
    }
    torch.save({"meta": meta, "state_dict": state}, path, _use_new_zipfile_serialization=zip_format)
    return state


def _check_numpy_meta(ckpt, state) -> None:
    meta = ckpt.meta
    assert type(meta["epoch"]) is np.int64 and meta["epoch"] == 24
    assert type(meta["hook_msgs"]["best_score"]) is np.float64
    assert meta["hook_msgs"]["best_score"] == pytest.approx(0.1372)
    assert meta["mean"].tolist() == [0.0, 1.0, 2.0] and meta["empty_boxes"].shape == (0, 7)
    assert ckpt.meta_summary() == {"mmcv_version": "1.4.0", "epoch": 24}
    assert type(ckpt.meta_summary()["epoch"]) is int
    assert list(ckpt.state_dict) == list(state)
    assert all(torch.equal(ckpt.state_dict[k], v) for k, v in state.items())


@pytest.mark.parametrize("zip_format", [True, False])
def test_numpy_in_meta_loads_by_default(tmp_path, zip_format):
    path = tmp_path / "numpy_meta.pth"
    state = fake_release_with_numpy_meta(path, zip_format=zip_format)
    _check_numpy_meta(read_released_checkpoint(path), state)

    # allow_numpy=False is the strict reading: tensors and containers only
    with pytest.raises(UnsafeCheckpointError) as info:
        read_released_checkpoint(path, allow_numpy=False)
    needed = info.value.globals_needed  # numpy's, and bytes for the empty array's buffer
    assert needed and all(g.startswith("numpy.") or g == "builtins.bytes" for g in needed)
    assert "allow_numpy=False" in str(info.value) and "--allow-unsafe-pickle" not in str(info.value)
    if zip_format:  # the static scan of a zip file names every global at once
        assert {NUMPY_SCALAR, "numpy.dtype"} <= set(info.value.globals_needed)


def test_numpy_1_names_in_a_legacy_release_load(tmp_path):
    # the same file as numpy 1.x writes it: torch.save pickles at protocol 2, so every global is a
    # newline-terminated GLOBAL opcode and the legacy format is read as a stream
    path = tmp_path / "numpy1.pth"
    state = fake_release_with_numpy_meta(path, zip_format=False)
    data = path.read_bytes()
    assert data.count(b"numpy._core.") >= 2
    path.write_bytes(data.replace(b"cnumpy._core.", b"cnumpy.core."))
    _check_numpy_meta(read_released_checkpoint(path), state)


def test_layouts_prefix_and_ignored_entries(tmp_path):
    state = tiny_state()
    path = tmp_path / "ddp.pth"
    torch.save(
        {"meta": {}, "state_dict": {"module." + k: v for k, v in state.items()}, "optimizer": {}}, path
    )
    ckpt = read_released_checkpoint(path)
    assert list(ckpt.state_dict) == list(state) and ckpt.stripped_prefix == "module."
    assert ckpt.ignored == ["optimizer"]
    torch.save(state, path)  # a bare state dict
    assert list(read_released_checkpoint(path).state_dict) == list(state)
    torch.save({"model": state}, path)
    assert list(read_released_checkpoint(path).state_dict) == list(state)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"state_dict": {"a": torch.ones(1), "b": "text"}}, r"not tensors: b \(str\)"),
        ({"weights": [torch.ones(1)]}, "no 'state_dict' entry"),
        ([torch.ones(1)], "holds a list"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(ReleasedCheckpointError, match=message):
        read_released_checkpoint(path)


def test_unreadable_and_missing_files(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(ReleasedCheckpointError, match="cannot read"):
        read_released_checkpoint(path)
    with pytest.raises(ReleasedCheckpointError, match="does not exist"):
        read_released_checkpoint(tmp_path / "absent.pth")


# --------------------------------------------------------------------------------------------------
# the four released runs, full size


SPOT_CHECKS = {  # hand-written (released, spotocc) pairs, one or more per module family
    "common": [
        ("img_neck.deblocks.1.0.weight", "image_neck.deblocks.1.0.weight"),
        ("img_neck.deblocks.1.1.running_mean", "image_neck.deblocks.1.1.running_mean"),
        (
            "img_view_transformer.depth_net.depth_conv.4.weight",
            "view_transformer.depth_net.depth_conv.4.weight",
        ),
        (
            "img_view_transformer.depth_net.depth_conv.4.conv_offset.weight",
            "view_transformer.depth_net.depth_conv.4.conv_offset.weight",
        ),
        ("img_view_transformer.depth_net.bn.running_var", "view_transformer.depth_net.bn.running_var"),
        ("img_view_transformer.frustum", "view_transformer.frustum"),
        ("img_view_transformer.nx", "view_transformer.nx"),
        (
            "img_bev_encoder_backbone.complBlock2.layers2.1.conv.1.running_mean",
            "voxel_encoder.completion2.layers2.1.conv.1.running_mean",
        ),
        ("img_bev_encoder_backbone.aggreBlock4.pool.weight", "voxel_encoder.aggregation4.pool.weight"),  # 1x1
        (
            "img_bev_encoder_backbone.resBlock0.net.4.num_batches_tracked",
            "voxel_encoder.res_block.net.4.num_batches_tracked",
        ),
        ("img_bev_encoder_neck.input_convs.2.0.weight", "voxel_neck.input_convs.2.0.weight"),
        ("img_bev_encoder_neck.up_sample.1.0.weight", "voxel_neck.up_sample.1.0.weight"),
        ("pts_bbox_head.transformer_decoder.post_norm.bias", "head.post_norm.bias"),
        ("pts_bbox_head.query_feat.weight", "head.query_content.weight"),
        ("pts_bbox_head.query_embed.weight", "head.query_pos.weight"),
        ("pts_bbox_head.cls_embed.weight", "head.class_embed.weight"),
        ("pts_bbox_head.mask_embed.2.bias", "head.mask_embed.2.bias"),
        ("pts_bbox_head.transformer_decoder.layers.3.norms.0.weight", "head.layers.3.cross_attn_norm.weight"),
        ("pts_bbox_head.transformer_decoder.layers.3.norms.1.bias", "head.layers.3.self_attn_norm.bias"),
        ("pts_bbox_head.transformer_decoder.layers.3.norms.2.weight", "head.layers.3.ffn_norm.weight"),
    ],
    "nusc": [
        ("img_backbone.conv1.weight", "image_backbone.body.conv1.weight"),
        ("img_backbone.layer3.4.bn2.running_var", "image_backbone.body.layer3.4.bn2.running_var"),
        ("img_backbone.layer4.0.downsample.0.weight", "image_backbone.body.layer4.0.downsample.0.weight"),
    ],
    "kitti": [
        ("img_backbone.layers.0.conv.weight", "image_backbone.body.conv_stem.weight"),
        (
            "img_backbone.layers.1.2.linear_conv.bn.running_mean",
            "image_backbone.body.blocks.0.2.bn2.running_mean",
        ),
        ("img_backbone.layers.3.6.expand_conv.conv.weight", "image_backbone.body.blocks.2.6.conv_pw.weight"),
        ("img_backbone.layers.5.13.se.conv2.conv.bias", "image_backbone.body.blocks.6.0.se.conv_expand.bias"),
        ("img_backbone.layers.6.conv.weight", "image_backbone.conv_head.weight"),
        ("img_backbone.layers.6.bn.running_var", "image_backbone.bn2.running_var"),
    ],
    "spot": [
        ("self_attn.attn.in_proj_weight", "self_attn.in_proj_weight"),
        ("ffn.layers.0.0.weight", "ffn.fc1.weight"),
        ("ffn.layers.1.bias", "ffn.fc2.bias"),
        ("pts_bbox_head.label_enc.weight", "head.dn_label_embed.weight"),
    ],
    "sparseocc": [
        ("attentions.0.attn.in_proj_weight", "cross_attn.in_proj_weight"),
        ("attentions.1.attn.out_proj.bias", "self_attn.out_proj.bias"),
        ("ffns.0.layers.0.0.bias", "ffn.fc1.bias"),
        ("ffns.0.layers.1.weight", "ffn.fc2.weight"),
        ("pts_bbox_head.empty_token.weight", "head.empty_token.weight"),
        ("pts_bbox_head.occ_pred_conv.3.weight", "head.occ_pred_conv.3.weight"),
    ],
}


def spot_checks(preset: str) -> list[tuple[str, str]]:
    head = "spot" if preset.startswith("spotocc") else "sparseocc"
    pairs = SPOT_CHECKS["common"] + SPOT_CHECKS[rl.dataset_of(preset)]
    layer = 6
    for theirs, ours in SPOT_CHECKS[head]:
        if not theirs.startswith("pts_bbox_head."):  # below a decoder layer
            theirs, ours = (
                f"pts_bbox_head.transformer_decoder.layers.{layer}.{theirs}",
                f"head.layers.{layer}.{ours}",
            )
        pairs.append((theirs, ours))
    if head == "spot":
        attn = "pem_cross_attn" if "kitti" in preset else "spot_cross_attn"
        for part in ("alpha", "query_proj.0.weight", "key_proj.1.bias", "proj.weight", "final.bias"):
            pairs.append(
                (
                    f"pts_bbox_head.transformer_decoder.layers.{layer}.{attn}.{part}",
                    f"head.layers.{layer}.cross_attn.{part}",
                )
            )
    return pairs


@pytest.mark.parametrize("preset", rl.PRESETS)
def test_released_run_loads_strictly_and_every_tensor_lands_exactly_once(preset, tmp_path):
    """A full-size synthetic checkpoint of each released run (random tensors with the released names
    and shapes, BN buffers, mmcv wrapping, torch.save) into ``build_model(cfg)``."""
    released = rl.released_state_dict(preset, seed=rl.PRESETS.index(preset))
    path = tmp_path / f"{preset}.pth"
    torch.save(rl.mmcv_checkpoint(released), path)
    model = build_model(get_config(preset), load_pretrained=False)
    try:
        report = load_released_checkpoint(model, path, config_name=preset)
    finally:
        path.unlink()  # ~0.4-0.65 GB
    own = model.state_dict()

    assert report.num_tensors == len(released) == len(own)
    assert sorted(report.conversion.names) == sorted(released)
    assert sorted(report.conversion.names.values()) == sorted(own)
    # independent of the mapping: the model now holds exactly the released tensors, each once
    assert Counter(map(rl.fingerprint, own.values())) == Counter(map(rl.fingerprint, released.values()))
    for theirs, ours in spot_checks(preset):
        assert torch.equal(own[ours], released[theirs]), (theirs, ours)
    for name, target in report.conversion.names.items():
        assert torch.equal(own[target], released[name]), name
    assert report.conversion.geometry_max_diff == {"dx": 0.0, "bx": 0.0, "nx": 0.0, "frustum": 0.0}
    assert report.meta["epoch"] == 24 and report.ignored == []
    assert f"to the {len(own)} tensors of {preset}" in report.summary()
