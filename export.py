r"""Export the encoder of a pre-training or fine-tuning checkpoint for torchaudio and for Hugging Face transformers.

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

A finetune.py checkpoint (one with a CTC head, aux.*) exports as a speech recogniser: the torchaudio file
gains aux.* (config aux_num_out) and "labels" (the CTC vocabulary), and DIR holds a
transformers.HubertForCTC with its processor (Wav2Vec2CTCTokenizer vocab.json, Wav2Vec2FeatureExtractor
without normalisation, as our training fed raw waveforms):

    processor = Wav2Vec2Processor.from_pretrained(DIR); model = HubertForCTC.from_pretrained(DIR)
    ids = model(**processor(audio, sampling_rate=16000, return_tensors="pt")).logits.argmax(-1)
    text = processor.batch_decode(ids)

Before anything is written, one random 1 s waveform goes through our model and through each exported
model: the export is refused if their last hidden states (CTC logits for a fine-tuned model) differ by more
than 1e-4.
"""
import argparse
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torchaudio

from model import HuBERTPretrainModel
from model.hubert import HUBERT_CONV
from utils.checkpoint import finetuned_model, has_ctc_head, load_checkpoint, pretrained_model
from utils.common_utils import atomic_write
from utils.ctc import spells_words

TOLERANCE = 1e-4
HEAD_FILE = "hubert_pretraining_head.pt"
# What --hf-dir holds after an export (save_pretrained's files across transformers versions, the head, the
# processor's): --overwrite replaces a folder holding only these, so it never deletes anything else.
HF_FILES = re.compile(r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                      r"model\.safetensors\.index\.json|" + re.escape(HEAD_FILE) + r"|vocab\.json|added_tokens\.json|"
                      r"(tokenizer|special_tokens_map|preprocessor|processor)(_config)?\.json")
# Our parameter names -> HubertModel's, by prefix; everything under them keeps its name (the positional
# conv's weight norm included: both are torch parametrizations, original0 = g, original1 = v, dim=2).
HF_PREFIXES = (
    ("wav2vec2.aux.", "lm_head."),
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
        aux_num_out=None if model.wav2vec2.aux is None else model.wav2vec2.aux.out_features,
    )


def hf_config(model: HuBERTPretrainModel):
    """The ``transformers.HubertConfig`` of the same architecture, with our masking and dropouts (and, with a
    CTC head, its vocabulary size, blank 0 and our fine-tuning's summed, zero-infinity CTC loss)."""
    from transformers import HubertConfig

    ta, cfg = torchaudio_config(model), model.config
    conv = ta["extractor_conv_layer_config"]
    ctc = {} if ta["aux_num_out"] is None else dict(
        vocab_size=ta["aux_num_out"], pad_token_id=0, bos_token_id=None, eos_token_id=None, final_dropout=0.0,
        ctc_loss_reduction="sum", ctc_zero_infinity=True)
    return HubertConfig(
        **ctc,
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


def hf_name(name: str, ctc: bool = False) -> Optional[str]:
    """HubertModel's (``ctc``: HubertForCTC's) name for one of our parameters, or None where it has none (the
    pre-training head)."""
    for ours, theirs in HF_PREFIXES:
        if name.startswith(ours):
            return ("hubert." if ctc and theirs != "lm_head." else "") + theirs + name[len(ours):]
    return None


def max_difference(what: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Largest absolute difference of two outputs (last hidden states or logits); an error above TOLERANCE
    (a mapping bug)."""
    if ours.shape != theirs.shape:
        raise ValueError(f"{what}: outputs of shape {list(theirs.shape)}, ours {list(ours.shape)}")
    diff = (ours - theirs).abs().max().item()
    if not diff <= TOLERANCE:
        raise ValueError(f"{what}: outputs differ by {diff:.3g} from ours (> {TOLERANCE}); not written")
    return diff


def torchaudio_export(model: HuBERTPretrainModel, vocab: Optional[Sequence[str]], waveform: torch.Tensor,
                      reference: torch.Tensor):
    """(the torchaudio file's contents, max difference from ours), checked by loading it into torchaudio."""
    obj = {"state_dict": encoder_state_dict(model), "config": torchaudio_config(model)}
    if vocab is not None:
        obj["labels"] = list(vocab)
    ta_model = torchaudio.models.wav2vec2_model(**obj["config"]).eval()
    ta_model.load_state_dict(obj["state_dict"])
    with torch.no_grad():
        return obj, max_difference("torchaudio export", reference, ta_model(waveform)[0])


def hf_export(model: HuBERTPretrainModel, waveform: torch.Tensor, reference: torch.Tensor):
    """(HubertModel, or HubertForCTC for a model with a CTC head, with our weights; the parameters it has no
    place for; max difference from ours)."""
    try:
        from transformers import HubertForCTC, HubertModel
    except ImportError as e:
        raise ValueError(f"--hf-dir needs transformers and safetensors (pip install transformers): {e}") from e
    ctc = model.wav2vec2.aux is not None
    hf_model = (HubertForCTC if ctc else HubertModel)(hf_config(model)).eval()
    hf_keys = set(hf_model.state_dict())
    mapped, head = {}, {}
    for name, value in model.state_dict().items():
        if name.startswith("wav2vec2.") or hf_name(name, ctc) in hf_keys:
            mapped[hf_name(name, ctc)] = value
        else:
            head[name] = value
    try:
        hf_model.load_state_dict(mapped)  # strict: a parameter left out on either side is an error
    except RuntimeError as e:
        raise ValueError(f"HF export: our parameters do not map onto {type(hf_model).__name__}'s: {e}") from e
    with torch.no_grad():
        out = hf_model(waveform)
    return hf_model, head, max_difference("HF export", reference, out.logits if ctc else out.last_hidden_state)


def save_processor(vocab: Sequence[str], out_dir: Path) -> None:
    """Wav2Vec2Processor files for a CTC export: the tokenizer (our tokens in output order; blank is HF's pad
    token, ``|`` its word delimiter; ``<unk>`` is added after them, for text outside the vocabulary; a token
    vocabulary gets HF's phoneme tokenizer, tokens separated by spaces, no phonemizer) and a feature extractor
    that passes the raw 16 kHz waveform through, as our training saw it."""
    from transformers import (Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2PhonemeCTCTokenizer,
                              Wav2Vec2Processor)

    vocab_file = out_dir / "vocab.json"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}, indent=2))
    if spells_words(vocab):
        tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token=vocab[0],
                                         word_delimiter_token=vocab[1], bos_token=None, eos_token=None)
    else:
        tokenizer = Wav2Vec2PhonemeCTCTokenizer(str(vocab_file), unk_token="<unk>", pad_token=vocab[0],
                                                do_phonemize=False, phone_delimiter_token=" ",
                                                word_delimiter_token=None, bos_token=None, eos_token=None)
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=False,
                                         return_attention_mask=True)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out_dir)


def write_hf(hf_model, head: Dict[str, torch.Tensor], vocab: Optional[Sequence[str]], out_dir: Path) -> None:
    """save_pretrained + the head file (+ the processor files) into a temporary folder, then renamed onto
    ``out_dir``."""
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    old = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.old")
    try:
        hf_model.save_pretrained(tmp)
        torch.save(head, tmp / HEAD_FILE)
        if vocab is not None:
            save_processor(vocab, tmp)
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
                        help="train.py or finetune.py checkpoint (.ckpt), or a state dict of HuBERTPretrainModel")
    parser.add_argument("--torchaudio", type=Path, default=None, metavar="FILE",
                        help="write the torchaudio state dict + wav2vec2_model config to this file")
    parser.add_argument("--hf-dir", type=Path, default=None, metavar="DIR",
                        help="write a transformers HubertModel folder (config.json, model.safetensors) here")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs (an --hf-dir only if it holds nothing but an export's files)")
    args = parser.parse_args(argv)
    if args.torchaudio is None and args.hf_dir is None:
        parser.error("nothing to do: give --torchaudio FILE and/or --hf-dir DIR")
    return args


def check_replaceable(hf_dir: Path) -> None:
    """An existing --hf-dir that --overwrite may replace: a folder of export.py's own files (HF_FILES) only; a
    file, a link, or a folder holding anything else (a checkpoint, other work) is refused, naming what is there."""
    if hf_dir.is_symlink() or not hf_dir.is_dir():
        raise ValueError(f"--hf-dir {hf_dir} exists and is not a folder (a file or a link): --overwrite replaces only "
                         "a folder that export.py wrote")
    others = sorted(p.name for p in hf_dir.iterdir() if not (HF_FILES.fullmatch(p.name) and p.is_file()
                                                            and not p.is_symlink()))
    if others:
        raise ValueError(f"--hf-dir {hf_dir} holds {len(others)} file(s) that export.py does not write "
                         f"({', '.join(others[:5])}{', ...' if len(others) > 5 else ''}): --overwrite would delete "
                         "them; move them or choose another --hf-dir")


def main(argv=None) -> None:
    args = parse_args(argv)
    for out in (args.torchaudio, args.hf_dir):
        if out is not None and (out.exists() or out.is_symlink()) and not args.overwrite:
            raise SystemExit(f"export.py: error: {out} already exists; pass --overwrite to replace it")
    if args.hf_dir is not None and (args.hf_dir.exists() or args.hf_dir.is_symlink()):
        try:
            check_replaceable(args.hf_dir)
        except ValueError as e:
            raise SystemExit(f"export.py: error: {e}") from e
    try:
        # The conv1d, GroupNorm layout that torchaudio and HF share, whatever the run trained with.
        obj = load_checkpoint(args.checkpoint)
        if has_ctc_head(obj):
            model, vocab = finetuned_model(obj, args.checkpoint)
        else:
            model, vocab = pretrained_model(obj, args.checkpoint, use_conv2d=False, use_instancenorm=False), None
        model.eval()
        waveform = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = model.wav2vec2(waveform)[0]
        # Build and check every export before writing any.
        ta = torchaudio_export(model, vocab, waveform, reference) if args.torchaudio else None
        hf = hf_export(model, waveform, reference) if args.hf_dir else None
        if ta is not None:
            obj, diff = ta
            with atomic_write(args.torchaudio) as f:
                torch.save(obj, f)
            params = sum(v.numel() for v in obj["state_dict"].values())
            print(f"Wrote {args.torchaudio}: torchaudio wav2vec2_model state dict and config"
                  f"{' with the CTC head and labels' if vocab else ''}, {params / 1e6:.1f} M parameters, "
                  f"max |diff| vs ours {diff:.1e}")
        if hf is not None:
            hf_model, head, diff = hf
            write_hf(hf_model, head, vocab, args.hf_dir)
            files = ", ".join(sorted(p.name for p in args.hf_dir.iterdir()))
            params = sum(p.numel() for p in hf_model.parameters())
            name = type(hf_model).__name__
            print(f"Wrote {args.hf_dir}/ ({files}): transformers {name}, {params / 1e6:.1f} M parameters, max |diff| "
                  f"vs ours {diff:.1e}; {name} has no place for the pre-training head, so {', '.join(head)} went to "
                  f"{HEAD_FILE}")
    except (OSError, ValueError) as e:
        raise SystemExit(f"export.py: error: {e}") from e


if __name__ == "__main__":
    main()
