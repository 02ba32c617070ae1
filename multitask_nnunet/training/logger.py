"""nnU-Net's per-epoch logger, extended with the classification curves.

nnU-Net's ``LocalLogger`` only accepts the keys it was created with and draws a fixed progress.png; this
subclass adds the classification keys and draws progress.png with an extra panel for macro-F1, accuracy
and the combined checkpoint metric.
"""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import join  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

CLASSIFICATION_KEYS = ("train_seg_losses", "train_cls_losses", "val_macro_f1", "val_accuracy", "val_class_recall",
                       "val_predicted_classes", "ema_macro_f1", "combined_metric", "train_guide_share")


class MultitaskLocalLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        self.my_fantastic_logging.update({k: [] for k in CLASSIFICATION_KEYS})

    def load_checkpoint(self, checkpoint: dict):
        """nnU-Net's, plus a NaN per epoch for a key that an older checkpoint lacks, so that resuming from it
        keeps one value per epoch in every list."""
        super().load_checkpoint(checkpoint)
        epochs = len(self.my_fantastic_logging["train_losses"])
        for key in CLASSIFICATION_KEYS:
            if key not in self.my_fantastic_logging:
                self.my_fantastic_logging[key] = [float("nan")] * epochs

    def plot_progress_png(self, output_folder):
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        x = list(range(epoch + 1))
        fig, axes = plt.subplots(4, 1, figsize=(16, 28))

        ax = axes[0]
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", label="loss_tr (total)", linewidth=3)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", label="loss_val (segmentation)", linewidth=3)
        ax2 = ax.twinx()
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=2)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", label="pseudo dice (mov. avg.)", linewidth=3)
        ax.set(xlabel="epoch", ylabel="loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.35, 1))

        ax = axes[1]
        ax.plot(x, log["val_macro_f1"][:epoch + 1], color="m", ls="dotted", label="val macro-F1 (per case)",
                linewidth=2)
        ax.plot(x, log["ema_macro_f1"][:epoch + 1], color="m", label="val macro-F1 (mov. avg.)", linewidth=3)
        ax.plot(x, log["val_accuracy"][:epoch + 1], color="c", label="val accuracy (per case)", linewidth=2)
        ax.plot(x, log["combined_metric"][:epoch + 1], color="k", label="combined metric (checkpoint_best)",
                linewidth=3)
        if any(v == v for v in log["train_guide_share"][:epoch + 1]):  # not all NaN (a head without a guide)
            ax.plot(x, log["train_guide_share"][:epoch + 1], color="y",
                    label="head pooling weight on the ground-truth guide (train)", linewidth=2)
        ax.set(xlabel="epoch", ylabel="classification", ylim=(0, 1.02))
        ax.legend(loc=(0, 1), ncol=2)

        ax = axes[2]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"], log["epoch_start_timestamps"])]
        ax.plot(x, durations[:epoch + 1], color="b", label="epoch duration", linewidth=3)
        ax.set(xlabel="epoch", ylabel="time [s]", ylim=(0, None))
        ax.legend(loc=(0, 1))

        ax = axes[3]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", label="learning rate", linewidth=3)
        ax.set(xlabel="epoch", ylabel="learning rate")
        ax.legend(loc=(0, 1))

        fig.tight_layout()
        fig.savefig(join(output_folder, "progress.png"))
        plt.close(fig)
