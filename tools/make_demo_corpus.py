"""Synthesize a small LibriSpeech-layout corpus with frame-level phone alignments (espeak-ng).

The corpus lets the whole recipe (preprocess -> train -> label quality) run without downloading
LibriSpeech, and it ships the ground-truth phones that PNMI needs:

    <out>/LibriSpeech/train-clean-100/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac  training speakers
    <out>/LibriSpeech/dev-clean/...                                                held-out speakers
    <out>/LibriSpeech/<subset>/<spk>/<chapter>/<spk>-<chapter>.trans.txt           transcripts
    <out>/alignments/<subset>.tsv   "<utt-id>\t<phone> <phone> ..." one phone per 10 ms frame
    <out>/README.txt                the exact command and the speaker table

Phone timings are espeak-ng's own phoneme events (libespeak-ng through ctypes with phoneme events
enabled): each event gives the sample where the synthesizer starts a phoneme. Phones use espeak's
ASCII mnemonics; pauses ("_", "_:", ...) and the added noise-only lead/tail are "sil".

Frame convention (the same as the MFCC frames of preprocess.py, T = floor((N - 400) / 160) + 1):
frame i covers samples [160 i, 160 i + 400) and takes the phone sounding at its centre 160 i + 200.

Every utterance is synthesized in a freshly forked process, because espeak-ng keeps state between
utterances (and cannot be re-initialised); so each file is a pure function of (seed, speaker,
utterance index) and re-running with the same arguments gives byte-identical files.
"""
import argparse
import ctypes
import ctypes.util
import multiprocessing
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
WIN, HOP = 400, 160
MIN_SAMPLES, MAX_SAMPLES = 32000, 250000  # the training length window of the recipe
SIL = "sil"
SUBSETS = {"train-clean-100": 0, "dev-clean": 1}
FIRST_SPEAKER_ID = {"train-clean-100": 100, "dev-clean": 900}
ACCENTS = ["en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4"]

# Built-in vocabulary for the sentence templates: plain words espeak-ng reads reliably.
WORDS = {
    "noun": "farmer ship river garden village letter window captain doctor forest mountain kitchen "
            "bridge morning question soldier teacher picture journey island meadow lantern harbour "
            "castle student engine basket blanket cottage valley shadow monkey pocket candle feather "
            "hammer ladder pencil rabbit saddle tiger violin whistle wizard orange umbrella puzzle "
            "jacket fountain dragon thread oyster",
    "adj": "old quiet bright heavy gentle narrow yellow hungry clever silent golden distant careful "
           "sudden empty busy tiny ancient frozen purple rough smooth brave lazy proud strange "
           "joyful cheap thick fresh",
    "vt": "found carried painted followed watched opened cleaned visited noticed borrowed repaired "
          "pushed dropped counted admired described chased fixed measured",
    "vi": "waited laughed stumbled vanished trembled wandered shouted whispered slept sang "
          "shivered arrived",
    "prep": "near behind beyond under across beside above through toward along",
    "adv": "slowly quietly happily suddenly carefully early loudly gladly eagerly rarely",
    "name": "Thomas Mary Peter Alice George Helen Arthur Lucy Walter Emma Oliver Ruth Joseph Judith",
    "time": "in_the_morning at_noon after_supper before_dawn every_evening last_summer on_Sunday "
            "yesterday at_midnight",
}
WORDS = {kind: [w.replace("_", " ") for w in words.split()] for kind, words in WORDS.items()}
TEMPLATES = [
    "the {adj} {noun} {vt} the {noun} {prep} the {noun}",
    "{name} {vt} a {adj} {noun} {time}",
    "{time}, {name} {vi} {adv} {prep} the {adj} {noun}",
    "we {vt} the {noun} and the {noun} {vi} {adv}",
    "there was a {adj} {noun} {prep} the {noun}, and {name} {vi}",
    "{name} said that the {noun} was {adj} and {adj}",
    "nobody {vt} the {adj} {noun} until {name} {vi} {time}",
    "the {noun} of the {adj} {noun} {vi} {prep} the {noun}",
    "{adv}, {name} and {name} {vt} the {noun}",
    "if the {noun} is {adj}, the {noun} will be {adj} {time}",
]


@dataclass
class Speaker:
    """One synthetic voice: espeak-ng voice name plus pitch, rate and noise level."""
    subset: str
    index: int
    speaker_id: int
    chapter_id: int
    voice: str       # e.g. "en-gb-scotland+f3"
    pitch: int       # espeak pitch 0..99
    pitch_range: int # espeak pitch range 0..99
    rate: int        # words per minute
    gain: float      # peak scale of the speech
    noise_std: float # std of the added white noise (full scale = 1)


def make_speakers(seed, subset, count, noise):
    """Draws `count` speakers. Accent and variant come from two seeded permutations indexed by one
    slot; as 8 and 11 are coprime, the 88 slots give 88 distinct voices. Train speakers take slots
    from the front, dev speakers from the back, so neither set shifts with the other's count."""
    rng = np.random.default_rng([seed])
    accents, variants = rng.permutation(ACCENTS), rng.permutation(VARIANTS)
    num_voices = len(ACCENTS) * len(VARIANTS)
    speakers = []
    for i in range(count):
        rng = np.random.default_rng([seed, SUBSETS[subset], i])
        slot = (i if subset == "train-clean-100" else num_voices - 1 - i) % num_voices
        speaker_id = FIRST_SPEAKER_ID[subset] + i
        speakers.append(Speaker(
            subset=subset, index=i, speaker_id=speaker_id, chapter_id=10 * speaker_id + 1,
            voice=f"{accents[slot % len(ACCENTS)]}+{variants[slot % len(VARIANTS)]}",
            pitch=int(rng.integers(25, 76)), pitch_range=int(rng.integers(30, 81)),
            rate=int(rng.integers(140, 191)), gain=float(rng.uniform(0.4, 0.9)),
            noise_std=noise * float(np.exp(rng.uniform(np.log(0.001), np.log(0.006))))))
    return speakers


def make_text(rng, target_words):
    """Joins template sentences until about `target_words` words; returns (spoken, transcript)."""
    sentences = []
    while sum(len(s.split()) for s in sentences) < target_words:
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        sentence = re.sub(r"\{(\w+)\}", lambda m: WORDS[m[1]][rng.integers(len(WORDS[m[1]]))], template)
        sentences.append(sentence[0].upper() + sentence[1:])
    spoken = ". ".join(sentences) + "."
    transcript = re.sub(r"[^A-Z' ]", "", spoken.upper())
    return spoken, " ".join(transcript.split())


class _Event(ctypes.Structure):
    """espeak_EVENT from speak_lib.h."""
    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                   ctypes.POINTER(_Event))
_AUDIO_OUTPUT_SYNCHRONOUS, _INITIALIZE_PHONEME_EVENTS, _CHARS_UTF8, _EVENT_PHONEME = 2, 1, 1, 7
_RATE, _PITCH, _RANGE = 1, 3, 4


def espeak_synth(voice, text, rate, pitch, pitch_range, rand_seed):
    """Synthesizes `text` in this process; returns (int16 samples at 22.05 kHz, [(sample, phone)]).
    Must run in a process that has not used espeak-ng before (see the module docstring)."""
    path = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise RuntimeError(f"cannot load libespeak-ng ({e}); install espeak-ng") from e
    if lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS) != ESPEAK_RATE:
        raise RuntimeError("espeak-ng did not initialise at 22050 Hz")
    chunks, events = [], []

    def callback(wav, num_samples, event):
        if num_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        i = 0
        while event[i].type != 0:  # the list ends with espeakEVENT_LIST_TERMINATED
            if event[i].type == _EVENT_PHONEME:
                events.append((event[i].sample, event[i].id.string.decode()))
            i += 1
        return 0

    keep_alive = _SYNTH_CALLBACK(callback)
    lib.espeak_SetSynthCallback(keep_alive)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f"espeak-ng has no voice {voice!r}")
    for parameter, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range)):
        lib.espeak_SetParameter(parameter, value, 0)
    ctypes.CDLL(None).srand(rand_seed)  # breathy variants draw noise from libc rand()
    data = text.encode()
    if lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, _CHARS_UTF8, None, None) != 0:
        raise RuntimeError(f"espeak-ng failed on {text!r}")
    lib.espeak_Synchronize()
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16), events


def _synth_job(job):
    """Pool task: draws the text for one utterance and synthesizes it, redrawing while the padded
    length would fall outside the training window."""
    seed, spk, utt = job
    rng = np.random.default_rng([seed, SUBSETS[spk.subset], spk.index, utt])
    for _ in range(20):
        lead, tail = rng.uniform(0.1, 0.5, size=2)
        target_seconds = rng.uniform(3.0, 10.0)
        spoken, transcript = make_text(rng, target_seconds * spk.rate / 60 * 0.8)
        wav, events = espeak_synth(spk.voice, spoken, spk.rate, spk.pitch, spk.pitch_range,
                                   rand_seed=int(rng.integers(2**31)))
        seconds = len(wav) / ESPEAK_RATE + lead + tail
        if MIN_SAMPLES / SAMPLE_RATE + 0.05 < seconds < MAX_SAMPLES / SAMPLE_RATE - 0.5:
            break
    return transcript, wav, events, float(lead), float(tail)


def frame_phones(num_samples, starts, phones):
    """Phone per 10 ms frame: frame i takes the phone whose segment contains sample 160 i + 200.
    `starts` are segment start samples (ascending, starts[0] == 0)."""
    num_frames = (num_samples - WIN) // HOP + 1
    centres = np.arange(num_frames) * HOP + WIN // 2
    index = np.searchsorted(np.asarray(starts), centres, side="right") - 1
    return [phones[i] for i in index]


def finish_utterance(spk, utt, seed, wav22k, events, lead, tail):
    """Resamples to 16 kHz, adds noise-only lead/tail and white noise; returns (int16 audio, phones)."""
    speech = torch.from_numpy(wav22k.astype(np.float32) / 32768.0)
    speech = torchaudio.functional.resample(speech, ESPEAK_RATE, SAMPLE_RATE).numpy()
    peak = float(np.abs(speech).max()) or 1.0
    lead_n, tail_n = int(lead * SAMPLE_RATE), int(tail * SAMPLE_RATE)
    audio = np.concatenate([np.zeros(lead_n), speech * (spk.gain / peak), np.zeros(tail_n)])
    rng = np.random.default_rng([seed, SUBSETS[spk.subset], spk.index, utt, 1])
    audio += rng.standard_normal(len(audio)) * spk.noise_std
    audio = np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)
    starts, phones = [0], [SIL]
    for sample, phone in events:
        starts.append(lead_n + round(sample * SAMPLE_RATE / ESPEAK_RATE))
        phones.append(SIL if phone.startswith("_") else phone)
    starts.append(lead_n + len(speech))
    phones.append(SIL)
    return audio, frame_phones(len(audio), starts, phones)


def write_atomic(path, writer):
    """Calls writer(temp_path) and renames the result into place, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_flac(path, audio):
    write_atomic(path, lambda tmp: sf.write(tmp, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16"))


def plan(args):
    """Speakers and utterance counts; --minutes is split 85/15 between train and dev speakers,
    assuming about 7 s per utterance (the mean length the drawn texts give)."""
    speakers = (make_speakers(args.seed, "train-clean-100", args.train_speakers, args.noise)
                + make_speakers(args.seed, "dev-clean", args.dev_speakers, args.noise))
    counts = {}
    for spk in speakers:
        if args.utts_per_speaker:
            counts[spk.speaker_id] = args.utts_per_speaker
        else:
            share = 0.85 if spk.subset == "train-clean-100" else 0.15
            per_subset = args.train_speakers if spk.subset == "train-clean-100" else args.dev_speakers
            counts[spk.speaker_id] = max(1, round(args.minutes * 60 * share / per_subset / 7.0))
    return speakers, counts


def make_corpus(args):
    """Generates the whole corpus into args.out; returns the summary line."""
    out = Path(args.out)
    speakers, counts = plan(args)
    jobs = [(args.seed, spk, utt) for spk in speakers for utt in range(counts[spk.speaker_id])]
    paths = [out / "LibriSpeech" / spk.subset / str(spk.speaker_id) / str(spk.chapter_id)
             / f"{spk.speaker_id}-{spk.chapter_id}-{utt:04d}.flac" for _, spk, utt in jobs]
    stray = sorted(set((out / "LibriSpeech").glob("**/*.flac")) - set(paths))
    if stray:
        raise SystemExit(f"error: {stray[0]} (and {len(stray) - 1} more) is not part of this corpus; "
                         "choose an empty --out or remove it")
    trans, align, stats = {}, {subset: {} for subset in SUBSETS}, []
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.jobs, maxtasksperchild=1) as pool:
        results = pool.imap(_synth_job, jobs, chunksize=1)
        progress = tqdm(zip(jobs, paths, results), total=len(jobs), desc="synthesizing", unit="utt")
        for (_, spk, utt), path, (transcript, wav22k, events, lead, tail) in progress:
            audio, phones = finish_utterance(spk, utt, args.seed, wav22k, events, lead, tail)
            write_flac(path, audio)
            utt_id = path.stem
            trans_path = path.with_name(f"{spk.speaker_id}-{spk.chapter_id}.trans.txt")
            trans.setdefault(trans_path, []).append(f"{utt_id} {transcript}\n")
            align[spk.subset][utt_id] = " ".join(phones)
            stats.append((spk, len(audio)))
    for path, lines in trans.items():
        write_text(path, "".join(lines))
    for subset, lines in align.items():
        write_text(out / "alignments" / f"{subset}.tsv", "".join(f"{u}\t{lines[u]}\n" for u in sorted(lines)))
    outside = sum(not MIN_SAMPLES <= n <= MAX_SAMPLES for _, n in stats)
    minutes = sum(n for _, n in stats) / SAMPLE_RATE / 60
    write_text(out / "README.txt", readme(args, speakers, stats, outside))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return (f"{len(speakers)} speakers ({args.train_speakers} train, {args.dev_speakers} dev), "
            f"{len(stats)} utterances, {minutes:.1f} min, {outside} outside 2-15.625 s, "
            f"{size / 1e6:.1f} MB in {out}")


def readme(args, speakers, stats, outside):
    """The corpus README: how to regenerate it, what is in it, and the speaker table."""
    command = ("python tools/make_demo_corpus.py --out " + shlex.quote(str(args.out))
               + f" --seed {args.seed} --train-speakers {args.train_speakers}"
               + f" --dev-speakers {args.dev_speakers} --minutes {args.minutes} --noise {args.noise}"
               + (f" --utts-per-speaker {args.utts_per_speaker}" if args.utts_per_speaker else ""))
    rows = []
    for spk in speakers:
        lengths = [n for s, n in stats if s is spk]
        rows.append(f"{spk.speaker_id:>5} {spk.subset:<16} {spk.voice:<22} {spk.pitch:>5} {spk.pitch_range:>5} "
                    f"{spk.rate:>4} {spk.noise_std:.4f} {len(lengths):>4} {sum(lengths) / SAMPLE_RATE:7.1f}\n")
    return (
        "Synthetic LibriSpeech-layout demo corpus (espeak-ng), generated from the repository root with\n\n"
        f"    {command}\n\n"
        "LibriSpeech/train-clean-100: training speakers; LibriSpeech/dev-clean: held-out speakers.\n"
        "16 kHz mono 16-bit FLAC; <spk>-<chapter>.trans.txt holds '<utt-id> <TRANSCRIPT>' lines.\n"
        "alignments/<subset>.tsv: '<utt-id>\\t<phone> ...', one espeak-ng phone per 10 ms frame; frame i\n"
        "covers samples [160 i, 160 i + 400) and takes the phone at sample 160 i + 200, so an utterance\n"
        "of N samples has floor((N - 400) / 160) + 1 frames. 'sil' marks pauses and the noise-only\n"
        "lead and tail. Timings are espeak-ng's phoneme events (a coda consonant can lag a few frames).\n"
        f"{len(stats)} utterances, {sum(n for _, n in stats) / SAMPLE_RATE / 60:.2f} minutes, "
        f"{outside} outside the 2-15.625 s training window.\n\n"
        "   id subset           voice                  pitch range rate noise  utts seconds\n"
        + "".join(rows))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_data"), help="corpus folder")
    parser.add_argument("--seed", type=int, default=0, help="draws voices, texts and noise")
    parser.add_argument("--train-speakers", type=int, default=12, help="speakers in train-clean-100")
    parser.add_argument("--dev-speakers", type=int, default=3, help="held-out speakers in dev-clean")
    parser.add_argument("--minutes", type=float, default=5.0, help="target total audio, 85%% train / 15%% dev")
    parser.add_argument("--utts-per-speaker", type=int, default=0, help="if > 0, overrides --minutes")
    parser.add_argument("--noise", type=float, default=1.0, help="scale of each speaker's noise level")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="synthesis processes")
    args = parser.parse_args(argv)
    if not 1 <= args.train_speakers <= 800 or not 1 <= args.dev_speakers <= 99:
        parser.error("need 1..800 train speakers and 1..99 dev speakers")
    if args.minutes <= 0 and args.utts_per_speaker <= 0:
        parser.error("--minutes or --utts-per-speaker must be positive")
    if args.noise < 0 or args.jobs < 1:
        parser.error("--noise must be >= 0 and --jobs >= 1")
    return args


if __name__ == "__main__":
    print(make_corpus(parse_args()))
