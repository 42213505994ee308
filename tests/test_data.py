"""Data plumbing and the offline datasets."""

import numpy as np
import pytest
import torch
from PIL import Image

from gileak import data
from gileak.cli import main
from gileak.default_plugins.datasets import LFW, Digits, Folder, Photos
from gileak.errors import DataUnavailableError, ParamsError, UserInputError
from gileak.fl import FLConfig


def test_fit_images_resizes_and_converts_channels():
    grey = torch.rand(2, 1, 8, 8)
    rgb = data.fit_images(grey, (3, 32, 32))
    assert rgb.shape == (2, 3, 32, 32) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = data.fit_images(torch.rand(2, 4, 16, 16), (1, 16, 16))  # RGBA -> grey, alpha dropped
    assert back.shape == (2, 1, 16, 16)
    flat = torch.full((1, 3, 40, 40), 0.25)
    assert torch.allclose(data.fit_images(flat, (3, 32, 32)), torch.full((1, 3, 32, 32), 0.25))
    same = torch.rand(3, 3, 32, 32)
    assert torch.equal(data.fit_images(same, (3, 32, 32)), same)


def test_partition_and_victims_are_seeded_and_checked():
    parts = data.iid_partition(103, 10, seed=1)
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    train, val = data.client_split(parts[0], 0.1, seed=1)
    assert len(val) == 1 and len(train) == len(parts[0]) - 1
    victims = data.pick_victims(train, 5, seed=2)
    assert len(set(victims.tolist())) == 5 and set(victims.tolist()) <= set(train.tolist())
    assert torch.equal(victims, data.pick_victims(train, 5, seed=2))
    with pytest.raises(UserInputError, match="--victims 20"):
        data.pick_victims(train, 20, seed=2)
    with pytest.raises(UserInputError):
        data.iid_partition(5, 10, seed=0)


def test_train_test_split_is_stratified_and_disjoint():
    images = torch.arange(100).float().view(100, 1, 1, 1)
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train_x, train_y, test_x, test_y = data.train_test_split(images, labels, 0.2, seed=0)
    assert test_y.bincount().tolist() == [10, 6, 4]
    assert not set(train_x.flatten().tolist()) & set(test_x.flatten().tolist())
    assert len(train_x) + len(test_x) == 100


@pytest.mark.parametrize("cls, shape, classes", [(Digits, (1, 8, 8), 10), (LFW, (1, 25, 25), 2),
                                                 (Photos, (3, 32, 32), 10)])
def test_builtin_datasets_declare_what_they_load(cls, shape, classes):
    dataset = cls()
    info = dataset.info()
    assert info.shape == shape and info.num_classes == classes
    splits = dataset.load()
    assert tuple(splits.train_images.shape[1:]) == shape
    assert 0 <= splits.train_images.min() and splits.train_images.max() <= 1
    assert set(splits.train_labels.unique().tolist()) == set(range(classes))
    assert len(splits.test_images) > 0


def test_photos_give_one_client_enough_images_for_the_papers_128_victims():
    splits = Photos().load()
    config = FLConfig()
    client = data.iid_partition(len(splits.train_images), config.clients, seed=0)[0]
    train, _ = data.client_split(client, config.val_fraction, seed=0)
    assert len(train) >= 128
    assert splits.train_images.flatten(1).std(1).min() >= 0.02  # no flat sky or white background


def write_png(path, size=(20, 12), colour=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def test_folder_reads_an_imagefolder_tree(tmp_path):
    for i in range(5):
        write_png(tmp_path / "cats" / f"{i}.png", colour=(200, 30, 30))
        write_png(tmp_path / "dogs" / f"{i}.jpg", colour=(30, 30, 200))
    (tmp_path / "notes.txt").write_text("not an image")
    dataset = Folder(path=str(tmp_path), size=16)
    assert dataset.info().num_classes == 2 and dataset.info().class_names == ("cats", "dogs")
    splits = dataset.load()
    assert splits.train_images.shape[1:] == (3, 16, 16)
    assert len(splits.train_images) + len(splits.test_images) == 10
    red = splits.train_images[splits.train_labels == 0]
    assert red[:, 0].mean() > 0.7 and red[:, 2].mean() < 0.2


def test_folder_reads_a_flat_folder_as_class_0_of_ten_and_flattens_transparency(tmp_path):
    write_png(tmp_path / "a.png", colour=(0, 0, 0, 0), mode="RGBA")  # fully transparent -> white
    write_png(tmp_path / "b.png")
    dataset = Folder(path=str(tmp_path), size=8, channels=1, test_fraction=0)
    info = dataset.info()
    assert info.num_classes == 10 and len(info.class_names) == 10  # a one-output model has nothing to attack
    assert (info.train_size, info.test_size) == (2, 0)
    splits = dataset.load()
    assert splits.train_images.shape == (2, 1, 8, 8)
    assert splits.train_labels.tolist() == [0, 0]
    assert splits.train_images[0].min() > 0.99
    assert Folder(path=str(tmp_path), classes=3).info().num_classes == 3


def test_folder_tree_keeps_its_class_count_and_classes_may_only_add(tmp_path):
    for i in range(3):
        write_png(tmp_path / "cats" / f"{i}.png")
        write_png(tmp_path / "dogs" / f"{i}.png")
        write_png(tmp_path / "owls" / f"{i}.png")
    assert Folder(path=str(tmp_path)).info().num_classes == 3
    assert Folder(path=str(tmp_path), classes=5).info().num_classes == 5
    with pytest.raises(UserInputError, match="classes=2.*3 class sub-folders"):
        Folder(path=str(tmp_path), classes=2).info()
    with pytest.raises(ParamsError, match="classes"):
        Folder(path=str(tmp_path), classes=1)


def test_a_one_class_tree_is_bad_input_unless_classes_is_given(tmp_path):
    for i in range(4):
        write_png(tmp_path / "only" / f"{i}.png")
    with pytest.raises(UserInputError, match="one-class task"):
        Folder(path=str(tmp_path)).info()
    assert Folder(path=str(tmp_path), classes=10).info().num_classes == 10


@pytest.mark.parametrize("counts,fraction", [([5, 5], 0.2), ([1, 7, 2], 0.25), ([3], 0.0), ([1], 0.5), ([9, 1], 0.5)])
def test_folder_declares_the_split_sizes_its_load_makes(tmp_path, counts, fraction):
    for label, count in enumerate(counts):
        for i in range(count):
            write_png((tmp_path / f"c{label}" if len(counts) > 1 else tmp_path) / f"{i}.png", size=(6, 6))
    dataset = Folder(path=str(tmp_path), size=4, test_fraction=fraction)
    info, splits = dataset.info(), dataset.load()
    assert (info.train_size, info.test_size) == (len(splits.train_images), len(splits.test_images))


@pytest.mark.parametrize("dataset", [Digits(), LFW(), Photos(grid=2), Photos()])
def test_offline_datasets_declare_the_split_sizes_they_load(dataset):
    info, splits = dataset.info(), dataset.load()
    assert (info.train_size, info.test_size) == (len(splits.train_images), len(splits.test_images))


def test_folder_info_does_not_read_pixels(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    dataset = Folder(path=str(tmp_path))
    assert dataset.info().shape == (3, 32, 32)  # no pixel read, so no error yet
    with pytest.raises(DataUnavailableError, match="broken.png"):
        dataset.load()


def test_folder_mistakes_are_clear_errors(tmp_path, capsys):
    with pytest.raises(DataUnavailableError, match="no such directory"):
        Folder(path=str(tmp_path / "nope")).info()
    with pytest.raises(DataUnavailableError, match="found no images"):
        Folder(path=str(tmp_path)).info()
    code = main(["bench", "--datasets", f"folder(path={tmp_path / 'nope'})", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "no such directory" in err and "Traceback" not in err


def test_a_handful_of_your_own_images_can_be_attacked(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
    code = main(["bench", "--datasets", f"folder(path={tmp_path},test_fraction=0)", "--victims", "3",
                 "--iterations", "3", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr()
