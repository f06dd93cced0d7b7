"""The refinement learns what it is for: trained for a few steps by self-training on a toy case whose dRAM is a
blurred copy of the lesion, its map moves towards the image's edges (IoU to the truth rises) -- DRAMTrainer's (the
classifier head on the image), and the method's attention, with and without the trainable CRF."""
import pytest
import torch
from scipy import ndimage

from nnunetv2_dram.architectures.dram_refinement import DRAMRefinement
from nnunetv2_dram.losses.self_training import calibrated_targets, self_training_loss
from nnunetv2_dram.training.dram_trainers import LOCAL_ATTENTION, DRAMTrainer


def _toy(n: int = 64):
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    truth = (((yy - 28).abs() < 9) & ((xx - 30).abs() < 12)) | (((yy - 46) ** 2 + (xx - 44) ** 2) < 30)
    image = (truth.float() + 0.15 * torch.randn(n, n, generator=g))[None, None]
    blurred = torch.from_numpy(ndimage.gaussian_filter(truth.float().numpy(), 4.0)).float()
    dram = torch.logit(blurred.clamp(0.02, 0.98) * 0.9 + 0.05)[None, None]
    region = torch.zeros(1, 1, n, n)
    region[..., 4:-4, 4:-4] = 1
    fraction = float(truth[region[0, 0] > 0].float().mean())
    return truth, image, dram, region, torch.tensor([[fraction, fraction]])


def _iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("attention, crf, head", [(DRAMTrainer.attention_settings, DRAMTrainer.crf_settings,
                                                   DRAMTrainer.head_settings),
                                                  (LOCAL_ATTENTION, None, None), (LOCAL_ATTENTION, {}, None)],
                         ids=["DRAMTrainer", "attention", "attention+crf"])
def test_a_few_self_training_steps_move_a_blurred_dram_towards_the_image_edges(attention, crf, head):
    truth, image, dram, region, interval = _toy()
    torch.manual_seed(0)
    refinement = DRAMRefinement(2, 1, attention, crf=crf, head=head, head_channels=1)
    optimizer = torch.optim.Adam(refinement.parameters(), lr=0.05)

    def iou_of(logits) -> float:  # the calibrated selection, as the pseudo labels make it
        return _iou(calibrated_targets(logits.detach(), region, interval)[0, 0], truth)

    def refined():
        return refinement(dram, image, image, (1.0, 1.0), region, head_features=image, return_head=True)

    untrained = iou_of(refined()[0])
    for _ in range(25):
        out, head_logits = refined()
        loss = self_training_loss(out, dram, region, interval)
        if refinement.head_own_loss:
            loss = loss + self_training_loss(head_logits, dram, region, interval)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = iou_of(refined()[0])
    blurred = iou_of(dram)
    assert blurred < 0.86
    assert trained > untrained + 0.02 and trained > blurred + 0.1, (blurred, untrained, trained)


def test_a_learnable_mix_lets_self_training_collapse_to_the_identity():
    """Why DRAMTrainer's attention has a fixed mix: with a learnable one, self-training against the thresholded
    input shrinks the mix (the identity reproduces the input best) instead of sharpening the affinities."""
    truth, image, dram, region, interval = _toy()
    torch.manual_seed(0)
    refinement = DRAMRefinement(2, 1, {"kernel_size": 3, "iterations": 2, "learn_mix": True, "init_mix": 0.5})
    optimizer = torch.optim.Adam(refinement.parameters(), lr=0.05)
    for _ in range(25):
        loss = self_training_loss(refinement(dram, image, image, (1.0, 1.0), region), dram, region, interval)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(refinement.attention.mix().detach()) < 0.35
