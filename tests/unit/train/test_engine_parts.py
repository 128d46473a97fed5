"""DS config, NaN check, checkpoint file ownership / pruning / resume resolution."""

import pytest
import torch

from app import storage
from app.config import load_config
from app.train import checkpoint as ckpt
from app.train.engine import ds_config, resolve_precision
from app.train.step import NonFiniteLoss, check_finite


def test_ds_config_sets_clipping_stage_and_precision_explicitly():
    cfg = load_config("demo", ["train.zero_stage=3", "train.batch_size_per_gpu=5",
                               "optim.clip_grad_mode=global"])
    c = ds_config(cfg, world_size=4, precision="bf16")
    assert c["gradient_clipping"] == 3.0  # DeepSpeed's own default is 1.0 since 0.19.3
    assert c["zero_optimization"]["stage"] == 3
    assert c["bf16"]["enabled"] is True and c["fp16"]["enabled"] is False
    assert c["train_batch_size"] == 20 and c["train_micro_batch_size_per_gpu"] == 5
    assert "optimizer" not in c  # a client torch AdamW, never DeepSpeed's JIT-built FusedAdam


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_gpu():
    cfg = load_config("vits14")
    assert resolve_precision(cfg, torch.device("cpu")) == "fp32"
    assert resolve_precision(cfg, torch.device("cuda", 0)) == "bf16"


def test_non_finite_loss_names_step_and_term():
    check_finite({"ibot_loss": 1.0, "total_loss": 2.0}, 3)
    with pytest.raises(NonFiniteLoss, match=r"step 7: koleo_loss=inf"):
        check_finite({"koleo_loss": float("inf"), "ibot_loss": 1.0}, 7)


def test_files_are_owned_by_the_rank_in_their_name():
    assert ckpt.file_owner("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert ckpt.file_owner("bf16_zero_pp_rank_12_mp_rank_00_optim_states.pt") == 12
    assert ckpt.file_owner("rng-rank00002.pt") == 2
    assert ckpt.file_owner("mp_rank_00_model_states.pt") is None
    assert ckpt.file_owner("teacher.pt") is None


def _fake_checkpoint(store, run, step):
    root = ckpt.checkpoints_uri(store, run)
    storage.put_bytes(storage.join(root, ckpt.step_tag(step), ckpt.STATE_FILE), b"{}")
    storage.put_bytes(storage.join(root, ckpt.LATEST), ckpt.step_tag(step).encode())


def test_prune_keeps_the_newest_k_and_the_latest(tmp_path):
    store = tmp_path.as_uri()
    for step in (10, 20, 30, 40):
        _fake_checkpoint(store, "r", step)
    ckpt.prune_checkpoints(store, "r", keep=2)
    assert ckpt.list_tags(store, "r") == ["step-00000030", "step-00000040"]
    assert ckpt.read_latest(store, "r") == "step-00000040"


def test_resume_resolution(tmp_path):
    store = tmp_path.as_uri()
    assert ckpt.resolve_resume("auto", store, "r") is None
    assert ckpt.resolve_resume("never", store, "r") is None
    _fake_checkpoint(store, "r", 50)
    uri = ckpt.resolve_resume("auto", store, "r")
    assert uri.endswith("/runs/r/checkpoints/step-00000050")
    assert ckpt.resolve_resume(uri, store, "other") == uri
    with pytest.raises(ValueError, match="train.resume"):
        ckpt.resolve_resume(store + "/elsewhere", store, "r")
    with pytest.raises(storage.NotFound):
        ckpt.resolve_resume(store + "/runs/r/checkpoints/step-00000099", store, "r")


def test_rng_state_round_trip():
    state = ckpt.rng_state()
    a = (torch.rand(2), __import__("random").random())
    ckpt.set_rng_state(state)
    assert torch.equal(torch.rand(2), a[0]) and __import__("random").random() == a[1]


def test_dinoctl_train_registers_and_builds_the_torchrun_command():
    from app.cli import build_parser
    from app.train.commands import torchrun_command

    args = build_parser().parse_args(["train", "--config", "demo", "--nproc", "2", "--set",
                                      "train.max_steps=3", "--resume", "auto"])
    cmd = torchrun_command(args)
    assert cmd[1:4] == ["-m", "app.launch.torchrun", "--standalone"]
    assert cmd[cmd.index("--nproc_per_node") + 1] == "2"
    assert cmd[cmd.index("app.entry") + 1] == "pretrain"
    assert cmd[-4:] == ["--set", "train.max_steps=3", "--resume", "auto"]


def test_a_checkpoint_of_another_parameter_group_layout_is_refused_in_one_line(tmp_path):
    """Flipping `optim.decay_learned_tokens` moves the tokens to other optimizer groups: the
    checkpoint's optimizer state cannot be loaded, and the resume says why before DeepSpeed does."""
    from app.ssl.meta_arch import build_network
    from app.ssl.param_groups import get_params_groups, group_layout

    cfg = load_config("demo", ["model.img_size=42", "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32"])
    net = build_network(cfg)
    decayed = group_layout(get_params_groups(net, 0.9, 0.2, decay_tokens=True))
    exempt = group_layout(get_params_groups(net, 0.9, 0.2, decay_tokens=False))
    assert decayed != exempt
    remote = storage.join(tmp_path.as_uri(), "runs", "r", "checkpoints", "step-00000002")
    storage.put_json(storage.join(remote, ckpt.STATE_FILE), {"world_size": 1, "zero_stage": 2, "step": 2,
                                                             "param_groups": decayed})
    with pytest.raises(ValueError, match="another optimizer parameter-group layout") as info:
        ckpt.load_checkpoint(None, None, remote, "r", 0, 1, 2, exempt)
    assert "decay_learned_tokens" in str(info.value) and "\n" not in str(info.value)
