"""base_release is the released configuration of microsoft/STELLAR key for key; base keeps
the paper's reading where the two differ; both print without any file and stop in one line
naming the file a run needs when it starts without it."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from stellar.train.config import flatten, load_preset
from stellar.train.train import load_config, lr_factor, main, peak_lr

# Every key of base_release whose value the released configuration decides, with that value
# as written in (or taken by the code behind) the released files. Paths are microsoft/STELLAR's:
# configs/stellar.yaml names, in its defaults list, model/stellar/stellar_model.yaml,
# datamodule/imagenet_datamodule.yaml, trainer/stellar_trainer.yaml, loss/stellar_loss.yaml
# and optimizer/adamw.yaml, and overrides some of their values; src/ holds the code.
STELLAR = "configs/stellar.yaml"
MODEL = "src/models/stellar_model.py"
DATASET = "src/datasets/imagenet_dataset.py"
RELEASED: dict[str, tuple[Any, str]] = {
    "init_required": (True, f"{STELLAR} model.vit_pretrained: facebook/vit-mae-base, always set"),
    "model.arch": ("vit_base_patch16_224", f"{STELLAR} vit_pretrained: facebook/vit-mae-base"),
    "model.img_size": (224, "facebook/vit-mae-base image_size; " + DATASET + " resolution=224"),
    "model.patch_size": (16, "facebook/vit-mae-base patch_size"),
    "model.num_tokens": (16, f"{STELLAR} model.num_sparse_tokens: 16"),
    "model.drop_path": (0.0, f"{MODEL}: transformers ViTModel, no stochastic depth"),
    "model.vit_kwargs": ({}, "facebook/vit-mae-base: ViT-B/16 as it is"),
    "model.spatial_temperature": (0.06, f"{STELLAR} model.spatial_temp: 0.06"),
    "model.decoder.dim": (512, f"{MODEL} decoder_config hidden_size=512"),
    "model.decoder.depth": (6, f"{STELLAR} model.num_decoder_layers: 6"),
    "model.decoder.num_heads": (8, f"{MODEL} decoder_config num_attention_heads=8"),
    "model.decoder.mlp_dim": (2048, f"{MODEL} decoder_config intermediate_size=2048"),
    "model.decoder.fourier_scale": (1.0, "src/models/modules/position_embedding.py scale 1.0"),
    "model.head.hidden_dim": (2048, f"{MODEL} OnlineClustering MLPBlock(mlp_dim=2048)"),
    "model.head.bottleneck_dim": (256, f"{STELLAR} model.prototype_dim: 256"),
    "model.head.num_prototypes": (16384, f"{STELLAR} model.num_clusters: 16384"),
    "model.head.normalize_prototypes": (False, f"{MODEL} OnlineClustering: plain nn.Linear"),
    "model.recon_target": ("vq", f"{STELLAR} model.vq_model: maskgit-vqgan-imagenet-f16-256.bin"),
    "teacher.mode": ("none", f"{STELLAR} model.momentum_teacher: False"),
    "teacher.momentum": (0.996, f"{STELLAR} model.teacher_momentum: 0.996"),
    "teacher.momentum_end": (0.996, f"{MODEL} update_teacher: a constant momentum"),
    "teacher.ema_steps": (None, f"{MODEL} update_teacher: no stage without the teacher"),
    "teacher.ema_mask_ratio": (None, f"{MODEL} forward_masked: one masking_ratio"),
    "loss.recon": (10.0, "src/losses/stellar_loss.py rec_coeff 10 for the MSE"),
    "loss.recon_vq": (0.05, "src/losses/stellar_loss.py rec_coeff 0.05 for VQ-CE"),
    "loss.cluster": (1.0, f"{STELLAR} loss.reg_coeff: 1.0 (clustering_loss)"),
    "loss.align": (1.0, f"{STELLAR} loss.reg_coeff: 1.0 (mask_loss)"),
    "loss.cls": (1.0, f"{STELLAR} loss.reg_coeff: 1.0 (cls_loss), model.do_cls: True"),
    "loss.koleo": (0.1, f"{MODEL} 0.1 * self.koleo_loss, model.do_koleo: True"),
    "loss.sk_temperature": (0.06, f"{MODEL} sk_temp=0.06"),
    "loss.sk_iters": (3, f"{MODEL} n_sk_iter=3"),
    "loss.sk_eps": (1e-8, f"{MODEL} sinkhorn_knopp eps=1e-8"),
    "loss.pred_temperature": (0.12, f"{MODEL} logits_temp=0.12"),
    "loss.matcher": ("sinkhorn", f"{STELLAR} model.hungarian_match: True -> MatcherSinkhorn"),
    "loss.match_eps": (0.1, f"{MODEL} MatcherSinkhorn epsilon=0.1"),
    "loss.match_iters": (5, f"{MODEL} MatcherSinkhorn n_iters=5"),
    "loss.match_rounding": ("argmax", f"{MODEL} MatcherSinkhorn P.argmax(dim=2)"),
    "loss.views": ("per_group", f"{MODEL} forward: cls_loss += local term; koleo_loss +="),
    "data.global_size": (224, f"{DATASET} global_transform size=(224, 224)"),
    "data.local_size": (96, f"{DATASET} local_transform size=(96, 96)"),
    "data.global_scale": ([0.36, 1.0], f"{DATASET} global_transform scale=(0.36, 1.0)"),
    "data.local_scale": ([0.06, 0.36], f"{DATASET} local_transform scale=(0.06, 0.36)"),
    "data.num_masked_views": (8, f"{STELLAR} model.num_masks: 8"),
    "data.num_local_crops": (8, f"{STELLAR} model.num_local_crops: 8"),
    "data.mask_ratio": (0.8, f"{STELLAR} model.masking_ratio: 0.8"),
    "data.masked_views": ("crops", f"{MODEL} global_views[:, :num_masks], 8 crops"),
    "data.masking": ("mixed", f"{STELLAR} model.focal_mode: gaussian (add_gaussian_bias)"),
    "data.focal_prob": (0.5, f"{MODEL} add_gaussian_bias p_focal=0.5"),
    "data.mask_sigma_range": ([0.1, 0.5], f"{MODEL} add_gaussian_bias sigma_range=(0.1, 0.5)"),
    "data.jitter_prob": (0.8, f"{MODEL} random_color_blur RandomApply(ColorJitter, p=0.8)"),
    "data.brightness": (0.4, f"{MODEL} ColorJitter(brightness=0.4)"),
    "data.contrast": (0.4, f"{MODEL} ColorJitter(contrast=0.4)"),
    "data.saturation": (0.2, f"{MODEL} ColorJitter(saturation=0.2)"),
    "data.hue": (0.1, f"{MODEL} ColorJitter(hue=0.1)"),
    "data.grayscale_prob": (0.2, f"{MODEL} RandomGrayscale(p=0.2)"),
    "data.blur_prob": (0.5, f"{MODEL} RandomApply(GaussianBlur, p=0.5)"),
    "data.blur_sigma": ([0.1, 2.0], f"{MODEL} GaussianBlur(sigma=(0.1, 2.0))"),
    "data.blur_sigma_scaled": (False, f"{MODEL} the same sigma on the 96-pixel local views"),
    "data.photometric_draw": ("batch", f"{MODEL} random_color_blur on the stacked views"),
    "data.num_workers": (8, "configs/datamodule/dataloaders/default_dataloader.yaml"),
    "train.batch_size": (128, f"{STELLAR} datamodule.dataloaders.train.batch_size: 128"),
    # 150 epochs (trainer.max_epochs), counted at the paper's 16 GPUs on ImageNet-1K's
    # 1.28 M images: 625 steps of 2048 images each, as the base preset counts them.
    "train.total_steps": (150 * 625, f"{STELLAR} trainer.max_epochs: 150"),
    "train.warmup_steps": (0, f"{STELLAR} defaults: no lr_scheduler"),
    "train.base_lr": (1.5e-4, f"{STELLAR} optimizer.lr: 0.00015"),
    "train.lr_scaling": ("none", f"{STELLAR} optimizer.lr, used as it is"),
    "train.lr_schedule": ("constant", f"{STELLAR} defaults: no lr_scheduler"),
    "train.weight_decay": (0.04, f"{STELLAR} optimizer.weight_decay: 0.04"),
    "train.weight_decay_groups": ("all", "configs/optimizer/adamw.yaml: no parameter groups"),
    "train.betas": ([0.9, 0.999], "configs/optimizer/adamw.yaml: none set, torch's default"),
    "train.clip_grad": (3.0, f"{STELLAR} trainer.gradient_clip_val: 3.0"),
    "train.amp": ("bf16", "configs/trainer/stellar_trainer.yaml precision: bf16-mixed"),
}

# The keys the released files do not decide (this package's own settings, or values a
# released setting leaves unused), with base_release's value and why.
NOT_RELEASED: dict[str, tuple[Any, str]] = {
    "seed": (0, "the package's"),
    "kernels": (None, "the package's backend choice"),
    "init": (None, "the local MAE file, given with --init"),
    "model.grad_checkpointing": (False, "the package's"),
    "model.vq_checkpoint": (None, "the local tokenizer file, given when training"),
    "data.source": ("shapes", "given with --data (the released code reads ImageNet)"),
    "data.num_images": (100000, "the embedded scenes'"),
    "data.image_size": (256, "the embedded scenes'"),
    "data.mask_sigma": (0.25, "unused with data.masking: mixed"),
    "train.device": ("auto", "the package's"),
    "train.lr_batch_ref": (256, "unused with train.lr_scaling: none"),
    "train.min_lr": (1e-6, "unused with train.lr_schedule: constant"),
    "train.log_every": (5, "the package's"),
    "train.ckpt_every": (1000, "the package's"),
    "train.progress": (True, "the package's"),
    "train.tensorboard": (False, "the package's"),
    "train.compile": (False, "the package's"),
}


def test_base_release_is_the_released_configuration_key_for_key():
    preset = flatten(load_preset("base_release"))
    assert set(RELEASED).isdisjoint(NOT_RELEASED)
    assert set(preset) == set(RELEASED) | set(NOT_RELEASED), set(preset) ^ (
        set(RELEASED) | set(NOT_RELEASED)
    )
    wrong = {
        key: (preset[key], want, where)
        for key, (want, where) in {**RELEASED, **NOT_RELEASED}.items()
        if preset[key] != want or type(preset[key]) is not type(want)
    }
    assert not wrong, wrong


def test_base_release_prints_without_any_file(capsys):
    assert main(["--preset", "base_release", "--print-config"]) == 0
    printed = flatten(yaml.safe_load(capsys.readouterr().out))
    for key, (want, _) in RELEASED.items():
        assert printed[key] == want, key
    assert printed["init"] is None and printed["model.vq_checkpoint"] is None


def test_base_release_stops_in_one_line_naming_the_missing_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--preset", "base_release", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stellar-train: error: training needs"), err
    assert "--init FILE" in err[0] and "model.vq_checkpoint=FILE" in err[0]
    # With the MAE file given, only the tokenizer's is missing (read before either file).
    mae = tmp_path / "mae.pth"
    mae.write_bytes(b"")
    assert main(["--preset", "base_release", "--output-dir", str(out), "--init", str(mae)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.vq_checkpoint=FILE" in err[0] and "--init" not in err[0]
    assert not out.exists()


def test_base_keeps_the_papers_reading_and_says_so():
    base = flatten(load_preset("base"))
    assert base["train.lr_scaling"] == "batch" and base["train.lr_schedule"] == "cosine"
    assert base["train.betas"] == [0.9, 0.95] and base["train.weight_decay_groups"] == "exempt"
    assert base["data.photometric_draw"] == "image" and base["data.blur_sigma_scaled"] is True
    assert base["init_required"] is False and base["model.recon_target"] == "pixels"
    comment = "".join(
        line for line in (_preset_text("base")).splitlines(keepends=True) if line[0] == "#"
    )
    assert "paper's reading" in comment and "base_release" in comment


def test_the_two_readings_of_the_learning_rate():
    """At the paper's 16 x 128 images: base rises to 1.5e-4 x 2048 / 256 and decays;
    base_release keeps 1.5e-4 from the first step to the last."""
    base, release = load_config("base"), load_config("base_release")
    peak = peak_lr(base, 16)
    assert peak == pytest.approx(1.2e-3)
    f = lr_factor(base, peak)
    total = base["train"]["total_steps"]
    assert f(0) * peak < 1e-6 and f(total) * peak == pytest.approx(1e-6)
    peak = peak_lr(release, 16)
    f = lr_factor(release, peak)
    total = release["train"]["total_steps"]
    for step in (0, 1, 6250, total // 2, total):
        assert f(step) * peak == pytest.approx(1.5e-4, rel=1e-12)


def _preset_text(name: str) -> str:
    from stellar.train.config import preset_path

    return preset_path(name).read_text()
