import numpy as np
import pytest
import torch

from fedtune.config import DataConfig
from fedtune.data import (
    Tokenized,
    batches,
    collate,
    default_data_dir,
    dirichlet,
    join_batches,
    load_text_classification,
    split_federated,
)
from fedtune.errors import DataError


def test_paper_split_sizes_and_disjointness():
    labels = np.arange(10003) % 77
    public, clients = split_federated(labels, DataConfig(samples_per_client=1667), seed=0)
    assert len(public) == 5002 and [len(c) for c in clients] == [1667, 1667, 1667]
    everything = np.concatenate([public, *clients])
    assert len(np.unique(everything)) == len(everything)
    public2, clients2 = split_federated(labels, DataConfig(samples_per_client=1667), seed=0)
    assert np.array_equal(public, public2) and np.array_equal(clients[2], clients2[2])
    public3, _ = split_federated(labels, DataConfig(), seed=1)
    assert not np.array_equal(public, public3)


def test_sizes_partition_and_errors():
    labels = np.zeros(100, dtype=np.int64)
    cfg = DataConfig(public_size=10, num_clients=3, partition="sizes", client_sizes=(5, 10, 20))
    _, clients = split_federated(labels, cfg, 0)
    assert [len(c) for c in clients] == [5, 10, 20]
    with pytest.raises(DataError, match="only 90 are available"):
        split_federated(labels, DataConfig(public_size=10, num_clients=3, samples_per_client=40), 0)
    with pytest.raises(DataError, match="leaves no data"):
        split_federated(labels, DataConfig(public_size=100), 0)
    with pytest.raises(DataError, match="cannot feed"):
        split_federated(labels, DataConfig(public_size=98, num_clients=3), 0)


def test_dirichlet_skews_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 100)
    pool = np.arange(1000)
    skewed = dirichlet(pool, labels, 4, alpha=0.1, rng=rng)
    flat = dirichlet(pool, labels, 4, alpha=1000.0, rng=rng)
    assert sum(len(p) for p in skewed) == 1000

    def max_share(parts):  # mean share of each client's most frequent label
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert max_share(skewed) > 0.3 > 0.15 > max_share(flat)


def test_collate_pads_dynamically():
    b = collate([[5, 6, 7], [8]], np.array([1, 0]), pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0]


def test_collate_pads_to_a_fixed_length():
    """``pad_to`` (data.pad_to_max_length): every batch is that wide; the mask still counts the
    real tokens, and a row longer than ``pad_to`` (never, after truncation) keeps its tokens."""
    b = collate([[5, 6, 7], [8]], np.array([1, 0]), pad_id=9, pad_to=5)
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 9], [8, 9, 9, 9, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    assert b["attention_mask"].sum(1).tolist() == [3, 1]
    assert collate([[5, 6, 7], [8]], np.array([1, 0]), 9, pad_to=2)["input_ids"].shape == (2, 3)
    # Generation: the targets are the response tokens only, never padding (prompt 2 tokens).
    g = collate([[1, 2, 3, 4]], np.array([0]), 9, np.array([2]), pad_to=6)
    assert g["input_ids"].tolist() == [[1, 2, 3, 4, 9, 9]]
    assert g["target_pos"].tolist() == [[1, 2]] and g["target_ids"].tolist() == [[3, 4]]


def test_collate_rounds_the_width_up_to_a_multiple():
    """``multiple`` (data.pad_multiple): the width is the smallest multiple of it that holds
    the longest row (or ``pad_to``); the mask still counts only the real tokens."""
    b = collate([[5, 6, 7], [8]], np.array([1, 0]), 9, multiple=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 9], [8, 9, 9, 9]]
    assert b["attention_mask"].sum(1).tolist() == [3, 1]
    for rows, pad_to, multiple, width in [
        ([[1] * 9], None, 8, 16),
        ([[1] * 8], None, 8, 8),
        ([[1] * 9], None, 1, 9),
        ([[1]], 80, 8, 80),
        ([[1]], 80, 7, 84),
    ]:
        shape = collate(rows, np.array([0]), 9, pad_to=pad_to, multiple=multiple)["input_ids"].shape
        assert shape == (1, width), (rows, pad_to, multiple)


def test_pad_multiple_reaches_every_batch_path(synth_dir):
    """data.pad_multiple reaches the clients' and the server's datasets, KD's public views
    and the deployed parties' data; the synthetic rows (12-29 tokens) then batch to 16 or 32."""
    from conftest import tiny_cfg
    from fedtune.data import prepare, prepare_client, prepare_server, subset
    from fedtune.frameworks.kd.common import selection_view
    from fedtune.models import load_tokenizer

    tok = load_tokenizer("tiny-gpt2")
    cfg = tiny_cfg(synth_dir, data={"pad_multiple": 16})
    full = prepare(cfg.data, tok, 80, cfg.seed)
    server, client = full.server_view(), full.client_view(0)
    views = [client.train, client.public, server.test, server.public]
    views += [
        prepare_server(cfg.data, tok, 80, 0).test,
        prepare_client(cfg.data, tok, 80, 0, 1).public,
    ]
    views += [subset(client.train, np.arange(5)), selection_view(server.public, np.arange(7))]
    for data in views:
        assert data.pad_multiple == 16
        for b in batches(data, np.arange(len(data)), 8, tok.pad_token_id):
            longest = int(b["attention_mask"].sum(1).max())
            assert b["input_ids"].shape[1] == -(-longest // 16) * 16 in (16, 32)


def test_pad_to_max_length_reaches_every_batch_path(synth_dir):
    """With data.pad_to_max_length every dataset a run builds batches from (a client's train
    and public sets, the server's test and public sets, deployed parties' data) yields
    ``[B, model.max_length]`` batches, also joined (batched engine, split client); without it,
    ``[B, longest row]``. The synthetic texts are 2 keywords + 2 fillers and 3 spaces: 12
    ("atm fee a my") to 29 bytes ("mastercard plastic please the"), one token each for the
    byte-level tiny tokenizer, so 80 is always padding."""
    from conftest import tiny_cfg
    from fedtune.data import prepare, prepare_client, prepare_server
    from fedtune.models import load_tokenizer

    tok = load_tokenizer("tiny-gpt2")
    fixed = tiny_cfg(synth_dir, data={"pad_to_max_length": True})  # prepare gets max_length 80
    full = prepare(fixed.data, tok, 80, fixed.seed)
    server, client = full.server_view(), full.client_view(0)
    views = [client.train, client.public, server.test, server.public]
    views += [prepare_server(fixed.data, tok, 80, 0).test]
    views += [prepare_client(fixed.data, tok, 80, 0, 1).public]
    for data in views:
        assert data.pad_to == 80
        for b in batches(data, np.arange(len(data)), 8, tok.pad_token_id):
            assert b["input_ids"].shape == (len(b["labels"]), 80)
    parts = [next(batches(d, np.arange(8), 8, tok.pad_token_id)) for d in views[:2]]
    assert join_batches(parts, tok.pad_token_id)["input_ids"].shape == (16, 80)
    rows = [client.train.ids[i] for i in range(8)]
    assert all(12 <= len(r) <= 29 for r in rows)
    b = next(batches(client.train, np.arange(8), 8, tok.pad_token_id))
    assert b["attention_mask"].sum(1).tolist() == [len(r) for r in rows]
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    dynamic = prepare(tiny_cfg(synth_dir).data, tok, 80, 0).client_view(0).train
    assert dynamic.pad_to is None and dynamic.ids == client.train.ids
    b = next(batches(dynamic, np.arange(8), 8, tok.pad_token_id))
    assert b["input_ids"].shape == (8, max(len(r) for r in rows))


def test_pad_to_max_length_for_generation(synth_dir):
    """Generation pairs pad to model.max_length too; the loss targets stay on the response."""
    from conftest import gen_cfg
    from fedtune.data import prepare
    from fedtune.models import load_tokenizer

    tok = load_tokenizer("tiny-gpt2")
    cfg = gen_cfg(synth_dir, data={"pad_to_max_length": True})
    full = prepare(cfg.data, tok, cfg.model.max_length, cfg.seed)
    train = full.client_view(0).train
    b = next(batches(train, np.arange(4), 4, tok.pad_token_id))
    assert b["input_ids"].shape == (4, cfg.model.max_length) == (4, 48)
    lengths = [len(train.ids[i]) for i in range(4)]
    assert b["attention_mask"].sum(1).tolist() == lengths
    real = b["target_ids"] != -100
    assert (b["target_pos"][real] + 1 < torch.tensor(lengths)[:, None].expand_as(real)[real]).all()


def test_group_by_length_keeps_every_sample_once():
    rng = np.random.default_rng(0)
    data = Tokenized([[1] * int(n) for n in rng.integers(1, 50, 300)], np.arange(300))
    seen = []
    widths = []
    for b in batches(data, np.arange(300), 8, 0, np.random.default_rng(1), group_by_length=True):
        seen += b["labels"].tolist()
        widths.append(b["input_ids"].shape[1] * len(b["labels"]))
    assert sorted(seen) == list(range(300))
    plain = [
        b["input_ids"].numel()
        for b in batches(data, np.arange(300), 8, 0, np.random.default_rng(1))
    ]
    assert sum(widths) < 0.8 * sum(plain)


def test_csv_errors_are_one_line(tmp_path):
    (tmp_path / "train.csv").write_text("text,category\nhello,a\nworld,b\n")
    with pytest.raises(DataError, match="test.csv"):
        load_text_classification(DataConfig(path=str(tmp_path)))
    (tmp_path / "test.csv").write_text("text,category\nhi,c\n")
    with pytest.raises(DataError, match="test labels unseen in training: c"):
        load_text_classification(DataConfig(path=str(tmp_path)))
    with pytest.raises(DataError, match="no column 'label'"):
        load_text_classification(DataConfig(path=str(tmp_path), label_column="label"))
    with pytest.raises(DataError, match="data folder not found"):
        load_text_classification(DataConfig(path=str(tmp_path / "missing")))


@pytest.mark.skipif(default_data_dir() is None, reason="Banking77 not present beside the repo")
def test_banking77_from_shared_folder():
    names, train, test = load_text_classification(DataConfig())
    assert len(names) == 77 and len(train.texts) == 10003 and len(test.texts) == 3080
    assert train.labels.max() == 76


def test_each_party_sees_only_its_own_data(synth_dir):
    """The server's view holds the test and public sets and the clients' sample counts; a
    client's holds its own samples and the public texts with their labels hidden; a deployed
    server's data (prepare_server) equals the simulation's server view."""
    from conftest import tiny_cfg
    from fedtune.data import prepare, prepare_server
    from fedtune.models import load_tokenizer

    cfg = tiny_cfg(synth_dir)
    tok = load_tokenizer("tiny-gpt2")
    full = prepare(cfg.data, tok, 32, cfg.seed)
    server = full.server_view()
    assert server.client_sizes == [60, 60, 60] and server.num_clients == 3
    assert len(server.public) == 60 and len(server.test) == 80
    assert server.public.ids == [full.train.ids[i] for i in full.public_idx]
    assert server.public.labels.tolist() == full.train.labels[full.public_idx].tolist()
    client = full.client_view(1)
    assert client.train.ids == [full.train.ids[i] for i in full.client_idx[1]]
    assert client.samples.tolist() == list(range(60))
    assert client.public.ids == server.public.ids and set(client.public.labels) == {-1}
    assert full.client_view(2).public is client.public  # one object: Predict jobs can fuse
    deployed = prepare_server(cfg.data, tok, 32, cfg.seed)
    assert deployed.client_sizes == server.client_sizes
    assert deployed.public.ids == server.public.ids and deployed.test.ids == server.test.ids
    assert deployed.public.labels.tolist() == server.public.labels.tolist()
