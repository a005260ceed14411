r"""Export the encoder of a pre-training checkpoint for torchaudio and for Hugging Face transformers.

    python export.py --checkpoint exp/checkpoints_.../epoch=...ckpt \
        --torchaudio hubert.pt --hf-dir hubert_hf

--torchaudio FILE writes {"state_dict": encoder weights, "config": torchaudio.models.wav2vec2_model
arguments}; the weights are in the conv1d layout, without the "wav2vec2." prefix. Rebuild it with

    obj = torch.load("hubert.pt", weights_only=True)
    model = torchaudio.models.wav2vec2_model(**obj["config"])
    model.load_state_dict(obj["state_dict"])

(a Base, Large or X-Large export also loads into torchaudio.models.hubert_base() / hubert_large() /
hubert_xlarge()).

--hf-dir DIR writes config.json and model.safetensors for transformers.HubertModel.from_pretrained(DIR).
HubertModel has no pre-training head, so final_proj and label_embeddings (and the mask embedding when the
config has no masking) go to DIR/hubert_pretraining_head.pt, under our parameter names, so nothing is lost.
The config keeps the pre-training masking and dropouts; HF applies them only in training mode, so set
e.g. mask_time_prob in from_pretrained(...) for fine-tuning. Our training passes the audio lengths, so
pass attention_mask to HubertModel for padded batches (unlike the fairseq Base checkpoints, whose HF docs
say not to); a group-norm extractor still normalises over the padding, in our model as in HF.

Before anything is written, one random 1 s waveform goes through our model and through each exported
model: the export is refused if their last hidden states differ by more than 1e-4.
"""
import argparse
import os
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch
import torchaudio

from model import HuBERTPretrainModel
from model.hubert import HUBERT_CONV
from utils.checkpoint import load_pretrained_model
from utils.common_utils import atomic_write

TOLERANCE = 1e-4
HEAD_FILE = "hubert_pretraining_head.pt"
# Our parameter names -> HubertModel's, by prefix; everything under them keeps its name (the positional
# conv's weight norm included: both are torch parametrizations, original0 = g, original1 = v, dim=2).
HF_PREFIXES = (
    ("wav2vec2.feature_extractor.", "feature_extractor."),
    ("wav2vec2.encoder.feature_projection.", "feature_projection."),
    ("wav2vec2.encoder.transformer.", "encoder."),
    ("mask_generator.mask_embedding", "masked_spec_embed"),
)


def torchaudio_config(model: HuBERTPretrainModel) -> Dict:
    """``torchaudio.models.wav2vec2_model`` arguments; dropouts as the model applies them (``no_layerdrop``
    and ``all_deterministic`` zero some of the configured values)."""
    cfg = model.config
    encoder = model.wav2vec2.encoder
    transformer = encoder.transformer
    layer = transformer.layers[0]
    return dict(
        extractor_mode=cfg["extractor_mode"],
        extractor_conv_layer_config=[list(c) for c in cfg["extractor_conv_layer_config"] or HUBERT_CONV],
        extractor_conv_bias=cfg["extractor_conv_bias"],
        encoder_embed_dim=cfg["encoder_embed_dim"],
        encoder_projection_dropout=encoder.feature_projection.dropout.p,
        encoder_pos_conv_kernel=cfg["encoder_pos_conv_kernel"],
        encoder_pos_conv_groups=cfg["encoder_pos_conv_groups"],
        encoder_num_layers=cfg["encoder_num_layers"],
        encoder_num_heads=cfg["encoder_num_heads"],
        encoder_attention_dropout=layer.attention.dropout,
        encoder_ff_interm_features=cfg["encoder_ff_interm_features"],
        encoder_ff_interm_dropout=layer.feed_forward.intermediate_dropout.p,
        encoder_dropout=transformer.dropout.p,
        encoder_layer_norm_first=cfg["encoder_layer_norm_first"],
        encoder_layer_drop=transformer.layer_drop,
        aux_num_out=None,
    )


def hf_config(model: HuBERTPretrainModel):
    """The ``transformers.HubertConfig`` of the same architecture, with our masking and dropouts."""
    from transformers import HubertConfig

    ta, cfg = torchaudio_config(model), model.config
    conv = ta["extractor_conv_layer_config"]
    return HubertConfig(
        feat_extract_norm={"group_norm": "group", "layer_norm": "layer"}[ta["extractor_mode"]],
        feat_extract_activation="gelu",
        conv_dim=[c[0] for c in conv],
        conv_kernel=[c[1] for c in conv],
        conv_stride=[c[2] for c in conv],
        conv_bias=ta["extractor_conv_bias"],
        feat_proj_layer_norm=True,
        feat_proj_dropout=ta["encoder_projection_dropout"],
        hidden_size=ta["encoder_embed_dim"],
        num_hidden_layers=ta["encoder_num_layers"],
        num_attention_heads=ta["encoder_num_heads"],
        intermediate_size=ta["encoder_ff_interm_features"],
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        num_conv_pos_embeddings=ta["encoder_pos_conv_kernel"],
        num_conv_pos_embedding_groups=ta["encoder_pos_conv_groups"],
        do_stable_layer_norm=ta["encoder_layer_norm_first"],
        hidden_dropout=ta["encoder_dropout"],
        attention_dropout=ta["encoder_attention_dropout"],
        activation_dropout=ta["encoder_ff_interm_dropout"],
        layerdrop=ta["encoder_layer_drop"],
        mask_time_prob=cfg["mask_prob"],
        mask_time_length=cfg["mask_length"],
        mask_time_min_masks=2,
        mask_feature_prob=cfg["mask_channel_prob"],
        mask_feature_length=cfg["mask_channel_length"],
        mask_feature_min_masks=0,
    )


def encoder_state_dict(model: HuBERTPretrainModel) -> Dict[str, torch.Tensor]:
    """The ``wav2vec2.`` part of the state dict, without the prefix: what torchaudio's Wav2Vec2Model loads."""
    prefix = "wav2vec2."
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def hf_name(name: str) -> Optional[str]:
    """HubertModel's name for one of our parameters, or None where HubertModel has none (the head)."""
    for ours, theirs in HF_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return None


def max_difference(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference of two last hidden states; an error above TOLERANCE (a mapping bug)."""
    if ours.shape != theirs.shape:
        raise ValueError(f"{what}: hidden states of shape {list(theirs.shape)}, ours {list(ours.shape)}")
    diff = (ours - theirs).abs().max().item()
    if not diff <= TOLERANCE:
        raise ValueError(f"{what}: last hidden states differ by {diff:.3g} from ours (> {TOLERANCE}); not written")
    return diff


def torchaudio_export(model: HuBERTPretrainModel, waveform: torch.Tensor, reference: torch.Tensor):
    """(the torchaudio file's contents, max difference from ours), checked by loading it into torchaudio."""
    obj = {"state_dict": encoder_state_dict(model), "config": torchaudio_config(model)}
    ta_model = torchaudio.models.wav2vec2_model(**obj["config"]).eval()
    ta_model.load_state_dict(obj["state_dict"])
    with torch.no_grad():
        return obj, max_difference("torchaudio export", reference, ta_model(waveform)[0])


def hf_export(model: HuBERTPretrainModel, waveform: torch.Tensor, reference: torch.Tensor):
    """(HubertModel with our weights, the parameters it has no place for, max difference from ours)."""
    try:
        from transformers import HubertModel
    except ImportError as e:
        raise ValueError(f"--hf-dir needs transformers and safetensors (pip install transformers): {e}") from e
    hf_model = HubertModel(hf_config(model)).eval()
    hf_keys = set(hf_model.state_dict())
    mapped, head = {}, {}
    for name, value in model.state_dict().items():
        if name.startswith("wav2vec2.") or hf_name(name) in hf_keys:
            mapped[hf_name(name)] = value
        else:
            head[name] = value
    try:
        hf_model.load_state_dict(mapped)  # strict: a parameter left out on either side is an error
    except RuntimeError as e:
        raise ValueError(f"HF export: our parameters do not map onto HubertModel's: {e}") from e
    with torch.no_grad():
        return hf_model, head, max_difference("HF export", reference, hf_model(waveform).last_hidden_state)


def write_hf(hf_model, head: Dict[str, torch.Tensor], out_dir: Path) -> None:
    """save_pretrained + the head file into a temporary folder, then renamed onto ``out_dir``."""
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    try:
        hf_model.save_pretrained(tmp)
        torch.save(head, tmp / HEAD_FILE)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults, and keep the examples in the description as written."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="train.py checkpoint (.ckpt) or a state dict of HuBERTPretrainModel")
    parser.add_argument("--torchaudio", type=Path, default=None, metavar="FILE",
                        help="write the torchaudio state dict + wav2vec2_model config to this file")
    parser.add_argument("--hf-dir", type=Path, default=None, metavar="DIR",
                        help="write a transformers HubertModel folder (config.json, model.safetensors) here")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    if args.torchaudio is None and args.hf_dir is None:
        parser.error("nothing to do: give --torchaudio FILE and/or --hf-dir DIR")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    for out in (args.torchaudio, args.hf_dir):
        if out is not None and out.exists() and not args.overwrite:
            raise SystemExit(f"export.py: error: {out} already exists; pass --overwrite to replace it")
    try:
        # The conv1d, GroupNorm layout that torchaudio and HF share, whatever the run trained with.
        model = load_pretrained_model(args.checkpoint, use_conv2d=False, use_instancenorm=False).eval()
        waveform = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = model.wav2vec2(waveform)[0]
        # Build and check every export before writing any.
        ta = torchaudio_export(model, waveform, reference) if args.torchaudio else None
        hf = hf_export(model, waveform, reference) if args.hf_dir else None
        if ta is not None:
            obj, diff = ta
            with atomic_write(args.torchaudio) as f:
                torch.save(obj, f)
            params = sum(v.numel() for v in obj["state_dict"].values())
            print(f"Wrote {args.torchaudio}: torchaudio wav2vec2_model state dict and config, "
                  f"{params / 1e6:.1f} M parameters, max |diff| vs ours {diff:.1e}")
        if hf is not None:
            hf_model, head, diff = hf
            write_hf(hf_model, head, args.hf_dir)
            files = ", ".join(sorted(p.name for p in args.hf_dir.iterdir()))
            params = sum(p.numel() for p in hf_model.parameters())
            print(f"Wrote {args.hf_dir}/ ({files}): transformers HubertModel, {params / 1e6:.1f} M parameters, "
                  f"max |diff| vs ours {diff:.1e}; HubertModel has no place for the pre-training head, so "
                  f"{', '.join(head)} went to {HEAD_FILE}")
    except (OSError, ValueError) as e:
        raise SystemExit(f"export.py: error: {e}") from e


if __name__ == "__main__":
    main()
