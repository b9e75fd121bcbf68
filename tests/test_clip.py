"""CLIP judges and the evaluation maths."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusion_core.clip_eval import (
    clip_scores,
    confusion_matrix,
    cosines,
    first_crossing,
    frechet_distance,
    per_class_table,
    rank_classes,
    recognizability,
    zero_shot,
)
from diffusion_core.clip_judge import ClipJudge, ClipModelError, to_clip_input
from diffusion_core.judges import check_entry, load_judge
from diffusion_core.data import DIGIT_NAMES


def test_clip_score_and_zero_shot_against_hand_computed_values():
    # 2 images, 2 classes, 2 templates, 2-D embeddings
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.8, 0.6]]])  # [K, T, D]
    cos = cosines(img, text)
    assert torch.allclose(cos, torch.tensor([[[1.0, 0.0], [-1.0, 0.8]], [[0.6, 0.8], [-0.6, 0.96]]]))
    labels = torch.tensor([0, 1])
    # image 0 vs class 0: 100 * mean(max(1,0), max(0,0)) = 50; image 1 vs class 1: 100 * mean(0, 0.96) = 48
    assert torch.allclose(clip_scores(cos, labels), torch.tensor([50.0, 48.0]))
    # mean cos per class: image 0 -> [0.5, -0.1] -> 0; image 1 -> [0.7, 0.18] -> 0
    assert zero_shot(cos).tolist() == [0, 0]
    conf = confusion_matrix(labels, zero_shot(cos), 2)
    assert conf.tolist() == [[1, 0], [1, 0]]


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g)
    a = a - a.mean(0)  # centred, so scaling leaves the mean at 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shifted = a + torch.tensor([2.0, 0.0, 0.0])
    assert frechet_distance(a, shifted) == pytest.approx(4.0, rel=1e-6)
    scaled = a * 2.0  # Sigma_b = 4 Sigma_a: trace term = tr(S + 4S - 2*2S) = tr(S) ~ 3
    assert frechet_distance(a, scaled) == pytest.approx(float(torch.trace(torch.cov(a.T.double()))), rel=1e-4)
    # singular covariances (fewer samples than dimensions) stay finite and non-negative
    assert frechet_distance(torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)) >= 0


def test_first_crossing_and_ranking():
    fr = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    assert first_crossing(fr, np.array([0, 0.2, 0.6, 0.95, 1.0]), 0.5) == 0.5
    assert first_crossing(fr, np.array([0, 0.2, 0.6, 0.95, 1.0]), 0.9) == 0.75
    assert np.isnan(first_crossing(fr, np.zeros(5), 0.5))
    # right by accident at the start (noise judged as this class), then wrong, then recognised
    assert first_crossing(fr, np.array([1.0, 0.0, 0.2, 0.9, 1.0]), 0.5) == 0.75
    assert first_crossing(fr, np.ones(5), 0.9) == 0.0
    names = ["a", "b", "c"]
    lab = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 0, 0])
    score = torch.tensor([30.0, 30, 20, 20, 10, 10])
    emb = F.normalize(torch.randn(6, 4), dim=-1)
    table = per_class_table(names, lab, score, pred, emb, lab, score + 1, lab, emb)
    assert table["accuracy_generated"].tolist() == [1.0, 0.5, 0.0]
    assert table["accuracy_gap"].tolist() == [0.0, 0.5, 1.0]
    assert rank_classes(table)["name"].tolist() == ["a", "b", "c"]


class BrightnessJudge:
    """A stand-in judge: the embedding says 'one' for bright images, 'zero' for dark ones."""

    def encode_images(self, images, batch_size=256):
        bright = (images.float().mean(dim=(1, 2, 3)) > 0).float()
        return torch.stack([1 - bright, bright], 1)


def test_recognizability_from_a_stored_trajectory():
    # 4 digits (two 'zero' = dark, two 'one' = bright) over 3 recorded points
    fractions = np.array([0.0, 0.5, 1.0])
    target = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(4, 1, 1, 1).expand(4, 1, 4, 4)
    x0 = torch.stack([-target, torch.cat([target[:2], -target[2:]]), target])  # wrong, half right, right
    x_t = x0.clone()
    labels = torch.tensor([0, 0, 1, 1])
    text = torch.eye(2)[:, None, :]  # class k's single prompt embeds to e_k
    curve, cross = recognizability(BrightnessJudge(), fractions, x_t, x0, labels, text, ["zero", "one"])
    allc = curve[(curve["class"] == "all") & (curve["image"] == "x0_pred")]["accuracy"].tolist()
    assert allc == [0.0, 0.5, 1.0]
    row = cross[(cross["class"] == "all") & (cross["image"] == "x0_pred")].iloc[0]
    assert row["fraction_50"] == 0.5 and row["fraction_90"] == 1.0
    zero = cross[(cross["class"] == "zero") & (cross["image"] == "x_t")].iloc[0]
    assert zero["fraction_50"] == 0.5


def test_the_judges_default_guess_for_noise_is_not_recognition():
    """At the first point every image is bright, so the judge says 'one' for all four: the ones are
    all judged correctly (recall 1) but only half of the 'one' verdicts are right (precision 0.5).
    'one' becomes recognizable at 90% only where its precision is 90% too."""
    fractions = np.array([0.0, 0.5, 1.0])
    target = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(4, 1, 1, 1).expand(4, 1, 4, 4)
    x0 = torch.stack([torch.ones_like(target), target, target])
    labels = torch.tensor([0, 0, 1, 1])
    curve, cross = recognizability(BrightnessJudge(), fractions, x0.clone(), x0, labels, torch.eye(2)[:, None, :], ["zero", "one"])
    one = curve[(curve["class"] == "one") & (curve["image"] == "x0_pred")]
    assert one["accuracy"].tolist() == [1.0, 1.0, 1.0] and one["precision"].tolist() == [0.5, 1.0, 1.0]
    row = cross[(cross["class"] == "one") & (cross["image"] == "x0_pred")].iloc[0]
    assert row["fraction_50"] == 0.0 and row["fraction_90"] == 0.5  # accuracy alone would say 0.0
    zero = cross[(cross["class"] == "zero") & (cross["image"] == "x0_pred")].iloc[0]
    assert zero["fraction_50"] == 0.5 and zero["fraction_90"] == 0.5


def test_to_clip_input_follows_the_models_preprocess_config():
    digits = torch.full((2, 1, 28, 28), -1.0)
    digits[:, :, 10:18, 10:18] = 1.0
    x = to_clip_input(digits, {"size": 56, "mean": (0.5, 0.4, 0.3), "std": (0.25, 0.2, 0.1)})
    assert x.shape == (2, 3, 56, 56)
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([-2.0, -2.0, -3.0]))  # black background
    assert torch.allclose(x[0, :, 28, 28], torch.tensor([2.0, 3.0, 7.0]), atol=1e-4)  # white stroke


TINY_ARCH = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_pretrained(tmp_path_factory):
    """A tiny randomly initialised open_clip model registered as an architecture and saved to a file."""
    import open_clip

    d = tmp_path_factory.mktemp("clipcfg")
    (d / "tiny-test-clip.json").write_text(json.dumps(TINY_ARCH))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    path = d / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_pretrained_model_loads_from_a_local_file(tiny_pretrained):
    path, reference = tiny_pretrained
    judge = load_judge(f"tiny-test-clip:{path}")
    assert isinstance(judge, ClipJudge)
    for a, b in zip(judge.model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    digits = torch.rand(3, 1, 28, 28) * 2 - 1
    emb = judge.encode_images(digits)
    assert emb.shape == (3, 16)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    prompts = judge.encode_prompts([["a 0", "zero"], ["a 1", "one"]])
    assert prompts.shape == (2, 2, 16)


def test_missing_pretrained_weights_fail_at_once_with_how_to(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipModelError, match="could not load the pretrained weights.*local file"):
        load_judge("ViT-B-32:laion2b_s34b_b79k")
    with pytest.raises(ClipModelError, match="not found"):
        check_entry(f"ViT-B-32:{tmp_path}/missing.bin")
    with pytest.raises(ClipModelError, match="unknown open_clip architecture"):
        check_entry("ViT-Z-99:laion2b_s34b_b79k")
    with pytest.raises(ClipModelError, match="not a pretrained tag"):
        check_entry("ViT-B-32:no-such-tag")


def test_digit_clip_trains_saves_and_loads_on_a_tiny_budget(mnist5k, tmp_path):
    from diffusion_core.clip_eval import text_embeddings
    from diffusion_core.digit_clip import load_digit_clip, save_digit_clip, train_digit_clip

    from diffusion_core.clip_eval import cosines, zero_shot

    train = {k: v[:2048] for k, v in mnist5k["train"].items()}  # 256 steps, about 2 s
    model, tok, pre, arch, seconds = train_digit_clip(train, DIGIT_NAMES, 4, 32, 2e-3, 32, 1, 16, seed=0, progress=False)
    save_digit_clip(tmp_path / "dc.pt", model, arch, pre, DIGIT_NAMES, {"steps": 256})
    judge = load_judge("digit-clip", "cpu", tmp_path / "dc.pt")
    text = text_embeddings(judge, DIGIT_NAMES)
    assert text.shape == (10, 8, 16)
    # it learned: zero-shot accuracy on 200 real test digits well above chance (10%); seeds 0-2 gave 79-92%
    test = mnist5k["test"]
    pred = zero_shot(cosines(judge.encode_images(test["images"][:200]), text))
    assert (pred == test["labels"][:200]).float().mean() > 0.5
    x = mnist5k["test"]["images"][:20]
    a = judge.encode_images(x)
    b = F.normalize(model.encode_image(to_clip_input(x, pre)), dim=-1)
    assert torch.allclose(a, b, atol=1e-5)
    assert load_digit_clip(tmp_path / "dc.pt")[2]["size"] == 28
    with pytest.raises(Exception, match="missing.pt"):
        load_judge("digit-clip", "cpu", tmp_path / "missing.pt")


def test_compact_vocabulary_trains_the_used_rows_exactly_as_the_full_table(mnist5k):
    """Training a table of the captions' tokens gives every weight the captions can reach the same
    values as training the whole 49,408-row table; the other rows keep their initial values."""
    from diffusion_core.clip_judge import class_prompts
    from diffusion_core.digit_clip import CompactVocabulary, arch_config, build, caption_tokens, train_digit_clip

    train = {k: v[:128] for k, v in mnist5k["train"].items()}
    args = (train, DIGIT_NAMES, 1, 32, 2e-3, 32, 1, 16)
    compact = train_digit_clip(*args, seed=0, progress=False)[0].state_dict()
    full = train_digit_clip(*args, seed=0, progress=False, compact_vocabulary=False)[0].state_dict()
    captions = [p for row in class_prompts(DIGIT_NAMES) for p in row]
    torch.manual_seed(0)
    init, tok, _ = build(arch_config(28, 32, 1, 16, caption_tokens(captions)))
    used = torch.unique(tok(captions))
    unused = torch.ones(len(full["token_embedding.weight"]), dtype=torch.bool)
    unused[used] = False
    assert 20 < len(used) < 100
    assert compact.keys() == full.keys()
    for k in full:
        if k == "token_embedding.weight":
            assert torch.allclose(compact[k][used], full[k][used], atol=1e-6)
            assert not torch.equal(compact[k][used], init.token_embedding.weight[used])  # trained
            assert torch.equal(compact[k][unused], init.token_embedding.weight[unused])  # untouched
        else:
            assert torch.allclose(compact[k], full[k], atol=1e-6), k
    with pytest.raises(ValueError, match="argmax"):
        init.text_pool_type = "eos"
        CompactVocabulary(init, used[None])


def test_digit_clip_muon_takes_the_transformer_blocks_matrices_and_each_group_peaks_at_its_own_rate():
    """Muon steps the two towers' attention and MLP matrices; AdamW the patch embedding, the
    position tables, the output projections, the token table, norms and biases. The one-cycle
    schedule warms each group up to its own rate and anneals both."""
    from diffusion_core.digit_clip import IO_LAYERS, arch_config, build, make_optimizer, one_cycle
    from diffusion_core.optim import Muon

    model, _, _ = build(arch_config(28, 32, 2, 16, 12))
    opt = make_optimizer(model, "muon", 2e-3, 8e-3)
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_group, adamw_group = opt.param_groups
    muon_names = {names[id(p)] for p in muon_group["params"]}
    expected = {n for n, p in model.named_parameters() if "resblocks" in n and p.ndim == 2}
    assert muon_names == expected and len(expected) == 2 * 2 * 4  # 2 towers x 2 blocks x (qkv, out, fc, proj)
    adam_names = {names[id(p)] for p in adamw_group["params"]}
    assert {"visual.conv1.weight", "visual.positional_embedding", "visual.proj", "text_projection", "positional_embedding",
            "token_embedding.weight"} <= adam_names  # IO_LAYERS and the token table
    assert len(IO_LAYERS) == 5
    sched = one_cycle(opt, total_steps=20)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    peaks = torch.tensor(seen).max(0).values
    assert torch.allclose(peaks, torch.tensor([8e-3, 2e-3]), rtol=1e-3)
    assert seen[0][0] < 8e-3 / 10 and seen[-1][0] < 8e-3 / 100  # warm-up from low, annealed to near 0
    assert isinstance(make_optimizer(model, "adamw", 2e-3, 8e-3), torch.optim.AdamW)


def test_the_text_context_is_the_longest_caption_and_padding_would_not_change_an_embedding():
    from diffusion_core.clip_judge import class_prompts
    from diffusion_core.digit_clip import arch_config, build, caption_tokens

    captions = [p for row in class_prompts(DIGIT_NAMES) for p in row]
    n = caption_tokens(captions)
    assert n == 12  # 'a black and white photo of the number "7".' and its start / end-of-text tokens
    assert caption_tokens(["7"]) == 3
    torch.manual_seed(0)
    long_model, long_tok, _ = build(arch_config(28, 32, 2, 16, 24))
    short_model, short_tok, _ = build(arch_config(28, 32, 2, 16, n))
    weights = long_model.state_dict()
    weights["positional_embedding"] = weights["positional_embedding"][:n]
    short_model.load_state_dict({k: v for k, v in weights.items() if k in short_model.state_dict()})
    long_tokens, short_tokens = long_tok(captions), short_tok(captions)
    assert long_tokens.shape[1] == 24 and torch.equal(long_tokens[:, :n], short_tokens) and not long_tokens[:, n:].any()
    with torch.no_grad():
        a, b = long_model.encode_text(long_tokens), short_model.encode_text(short_tokens)
    assert torch.allclose(a, b, atol=1e-5)
