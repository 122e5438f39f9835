import numpy as np
import pytest

from fedtune.config import DataConfig
from fedtune.data import (
    Tokenized,
    batches,
    collate,
    default_data_dir,
    dirichlet,
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
