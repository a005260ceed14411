"""CheckpointKeeper: a resumed checkpoint's keeper state names the files it later prunes; a crafted one deletes
nothing but the keeper's own checkpoints in its own folder."""
from types import SimpleNamespace

from utils.callbacks import CheckpointKeeper


class FakeTrainer:
    """The few Trainer attributes CheckpointKeeper.save uses; save_checkpoint writes a real file."""

    def __init__(self, epoch, step, val_loss):
        self.current_epoch, self.global_step, self.is_global_zero = epoch, step, True
        self.callback_metrics = {"val_loss": val_loss, "train_loss": val_loss}
        self.strategy = SimpleNamespace(barrier=lambda name: None)

    def save_checkpoint(self, path, weights_only=False):
        path.write_bytes(b"state")


def test_a_crafted_keeper_state_prunes_only_the_keepers_own_files(tmp_path):
    run = tmp_path / "exp" / "checkpoints"
    run.mkdir(parents=True)
    victims = [tmp_path / "exp" / "hparams.yaml", tmp_path / "precious.ckpt", run / "notes.ckpt",
               run / "epoch=0-step=1.ckpt.bak"]
    for victim in victims:
        victim.write_text("keep me")
    (run / "sub").mkdir()
    (run / "sub" / "epoch=0-step=3.ckpt").write_text("keep me")
    old = run / "epoch=0-step=2.ckpt"
    old.write_text("an earlier checkpoint of this run")
    keeper = CheckpointKeeper(run, top_k=1)
    keeper.load_state_dict({
        "dirpath": str(run.resolve()),
        "best": {"val_loss": [(0.5, "../hparams.yaml"), (0.6, str(tmp_path / "precious.ckpt")), "junk",
                              (0.7, "sub/epoch=0-step=3.ckpt"), ("x", "epoch=0-step=2.ckpt")],
                 "train_loss": [(0.5, "epoch=0-step=2.ckpt"), (0.6, "notes.ckpt"), (0.7, "epoch=0-step=1.ckpt.bak")]},
        "newest": "../../precious.ckpt",
    })
    assert keeper.best == {"val_loss": [], "train_loss": [(0.5, "epoch=0-step=2.ckpt")]} and keeper.newest is None

    keeper.save(FakeTrainer(1, 10, 0.4), ranked=True)  # better than all: whatever was kept before is pruned
    assert not old.exists() and (run / "epoch=1-step=10.ckpt").exists()
    assert all(victim.read_text() == "keep me" for victim in victims)
    assert (run / "sub" / "epoch=0-step=3.ckpt").exists()


def test_a_state_of_another_folder_or_malformed_is_ignored(tmp_path):
    (tmp_path / "epoch=0-step=2.ckpt").write_text("x")
    keeper = CheckpointKeeper(tmp_path)
    keeper.load_state_dict({"dirpath": "/elsewhere", "best": {"val_loss": [(0.1, "epoch=0-step=2.ckpt")]},
                            "newest": "epoch=0-step=2.ckpt"})
    assert keeper.kept() == {None}
    keeper.load_state_dict({"dirpath": str(tmp_path.resolve()), "best": "junk", "newest": 3})
    assert keeper.kept() == {None}
    keeper.load_state_dict({"dirpath": str(tmp_path.resolve()), "best": {"val_loss": [(1, "epoch=0-step=2.ckpt")]},
                            "newest": "epoch=0-step=2.ckpt"})
    assert keeper.best["val_loss"] == [(1.0, "epoch=0-step=2.ckpt")] and keeper.newest == "epoch=0-step=2.ckpt"
