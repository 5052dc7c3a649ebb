"""Data loading on small files generated in the exact on-disk formats."""
import gzip
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_cifar_like, make_mnist_like, write_idx
from torchvision import datasets

from locallip.data import DEBIAN_FASHION, IdxImages, get_dataset, get_loaders, read_idx
from locallip.errors import UserError


def args_for(data, data_dir, **kw):
    a = dict(data=data, data_dir=data_dir, no_download=True, no_augmentation=True, n_train=0,
             n_test=0, batch_size=16, test_batch_size=32, workers=0, seed=0, cpu=True)
    a.update(kw)
    return SimpleNamespace(**a)


def test_mnist_raw_format_through_torchvision(tmp_path):
    root = make_mnist_like(str(tmp_path), n_train=40, n_test=20)
    ds = get_dataset('mnist', root, train=True, augment=False, download=False)
    assert isinstance(ds, datasets.MNIST) and len(ds) == 40
    raw = read_idx(os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte'))
    x, y = ds[3]
    assert torch.allclose(x[0], torch.from_numpy(raw[3].copy()).float() / 255)
    train, test = get_loaders(args_for('mnist', root, n_train=33))
    assert len(train.dataset) == 33 and len(test.dataset) == 20
    seen = []
    for x, y, idx in train:
        assert x.shape[1:] == (1, 28, 28) and x.min() >= 0 and x.max() <= 1
        seen += idx.tolist()
    assert sorted(seen) == list(range(33))
    x, y, idx = next(iter(test))
    assert idx.tolist() == list(range(20))            # test order is the dataset order


def test_cifar10_python_format(tmp_path, monkeypatch):
    root = make_cifar_like(str(tmp_path), n_per_batch=10)
    # generated files cannot match torchvision's md5 sums; everything else is the real path
    monkeypatch.setattr(datasets.cifar, 'check_integrity', lambda path, md5=None: os.path.isfile(path))
    train, test = get_loaders(args_for('cifar10', root, no_augmentation=False))
    assert len(train.dataset) == 50 and len(test.dataset) == 10
    x, y, idx = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.long


def test_fashion_idx_gz_like_debian(tmp_path):
    folder = tmp_path / 'data' / 'FashionMNIST' / 'raw'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 28, 28)).astype(np.uint8)
    labels = rng.integers(0, 10, 12).astype(np.uint8)
    for name, arr in (('t10k-images-idx3-ubyte', imgs), ('t10k-labels-idx1-ubyte', labels)):
        write_idx(str(folder / name), arr)
        with open(folder / name, 'rb') as f, gzip.open(str(folder / name) + '.gz', 'wb') as g:
            shutil.copyfileobj(f, g)
        os.remove(folder / name)
    ds = get_dataset('fashionmnist', str(tmp_path / 'data'), train=False, augment=False)
    assert isinstance(ds, IdxImages) and len(ds) == 12
    x, y = ds[5]
    assert x.shape == (1, 28, 28) and y == int(labels[5])
    assert torch.equal(x[0], torch.from_numpy(imgs[5]).float() / 255)


@pytest.mark.skipif(not os.path.isdir(DEBIAN_FASHION), reason="dataset-fashion-mnist not installed")
def test_fashion_from_debian_package(tmp_path, monkeypatch):
    """No --data_dir: data/ first, then the package; --data_dir system: the package only."""
    monkeypatch.chdir(tmp_path)                       # no data/ here
    train = get_dataset('fashionmnist', None, train=True, augment=False)
    test = get_dataset('fashionmnist', 'system', train=False, augment=False)
    assert len(train) == 60000 and len(test) == 10000
    assert train.source == test.source == DEBIAN_FASHION
    assert sorted(set(test.targets.tolist())) == list(range(10))
    # a data/ copy wins over the package when no --data_dir is given
    make_mnist_like(str(tmp_path / 'data'), n_train=6, n_test=4, name='FashionMNIST')
    assert len(get_dataset('fashionmnist', None, train=False, augment=False)) == 4


def test_a_given_data_dir_is_the_one_read(tmp_path):
    """A given --data_dir without the dataset is refused (never replaced by the system
    copy); IDX files directly in it, or under FashionMNIST/raw, are read and named."""
    empty = str(tmp_path / 'no' / 'such')
    with pytest.raises(UserError) as e:
        get_dataset('fashionmnist', empty, train=False, augment=False, download=False)
    msg = str(e.value)
    assert 'not found under' in msg and empty in msg and '--data_dir system' in msg
    root = make_mnist_like(str(tmp_path / 'mine'), n_train=6, n_test=5, name='FashionMNIST')
    ds = get_dataset('fashionmnist', root, train=False, augment=False, download=False)
    assert len(ds) == 5 and ds.source == os.path.join(root, 'FashionMNIST', 'raw')
    direct = os.path.join(root, 'FashionMNIST', 'raw')
    ds = get_dataset('fashionmnist', direct, train=True, augment=False, download=False)
    assert len(ds) == 6 and ds.source == direct
    with pytest.raises(UserError, match='needs a folder'):
        get_dataset('mnist', 'system', train=False, augment=False)
    _, test = get_loaders(args_for('fashionmnist', root))
    assert test.source == direct
    mnist = make_mnist_like(str(tmp_path / 'digits'), n_train=6, n_test=5)
    assert get_loaders(args_for('mnist', mnist))[0].source == os.path.join(mnist, 'MNIST')


def test_missing_dataset_is_one_clear_error(tmp_path):
    for name in ('mnist', 'cifar10', 'tinyimagenet'):
        with pytest.raises(UserError) as e:
            get_dataset(name, str(tmp_path / 'empty'), train=True, augment=False, download=False)
        msg = str(e.value)
        assert name in msg and 'empty' in msg and 'to get it' in msg


def test_bad_idx_file(tmp_path):
    p = tmp_path / 'bad'
    p.write_bytes(b'\x00\x00\x0d\x01\x00\x00\x00\x01\x00')
    with pytest.raises(UserError, match='not an unsigned-byte IDX'):
        read_idx(str(p))


def test_evaluation_downloads_the_test_split_only(tmp_path, monkeypatch):
    """The MNIST test split alone: only its two files are fetched (torchvision's own download
    takes both splits), read from the raw folder; a failed download leaves no empty folder."""
    from locallip import data as data_load
    rng = np.random.default_rng(1)
    fetched = []

    def fake(url, download_root, filename, md5):
        fetched.append(filename)
        arr = (rng.integers(0, 256, (7, 28, 28)) if 'images' in filename
               else rng.integers(0, 10, 7)).astype(np.uint8)
        write_idx(os.path.join(download_root, filename[:-3]), arr)
    monkeypatch.setattr(data_load, 'download_and_extract_archive', fake)
    ds = get_dataset('mnist', str(tmp_path / 'd'), train=False, augment=False, download=True)
    assert len(ds) == 7 and sorted(fetched) == ['t10k-images-idx3-ubyte.gz',
                                                 't10k-labels-idx1-ubyte.gz']
    assert sorted(os.listdir(tmp_path / 'd' / 'MNIST' / 'raw')) == ['t10k-images-idx3-ubyte',
                                                                    't10k-labels-idx1-ubyte']
    # again: read from the folder, nothing fetched
    fetched.clear()
    assert len(get_dataset('mnist', str(tmp_path / 'd'), train=False, augment=False)) == 7
    assert fetched == []

    def offline(url, download_root, filename, md5):
        raise OSError("no network")
    monkeypatch.setattr(data_load, 'download_and_extract_archive', offline)
    with pytest.raises(UserError, match='download failed.*no network'):
        get_dataset('mnist', str(tmp_path / 'e'), train=False, augment=False, download=True)
    assert not os.path.exists(tmp_path / 'e' / 'MNIST')
