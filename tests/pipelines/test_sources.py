"""Sources on real inputs: fine-t2i tars, LAION parquet + a loopback HTTP server, folders, class folders."""

from __future__ import annotations

from collections import Counter

import pytest
from pydantic import TypeAdapter, ValidationError

from pipelines.demo.photos import write_photo_folder
from pipelines.preprocess import PreprocessConfig
from pipelines.sources import (
    ClassFolderConfig,
    FineT2IConfig,
    FolderConfig,
    InputUnit,
    LaionConfig,
    SourceConfig,
    build_source,
    select_units,
)
from pipelines.sources.finet2i import mixed_caption_field
from services import storage
from tests.fixtures.corpora import (
    LAION_FETCH_SETTINGS,
    PHOTOS,
    LoopbackImageServer,
    finet2i_records,
    laion_rows,
    make_class_folder_corpus,
    make_finet2i_tar,
    make_laion_parquet,
    reasons_by_key,
)

PREPROCESS = PreprocessConfig(resolution=64, multiple_of=32)


def all_samples(source):
    return [sample for unit in source.list_units() for sample in source.iter_samples(unit)]


@pytest.fixture(scope="module")
def image_server():
    with LoopbackImageServer() as server:
        yield server


@pytest.fixture
def finet2i_dir(tmp_path):
    subset = tmp_path / "synthetic_x"
    make_finet2i_tar(subset / "train-000000.tar", finet2i_records(PHOTOS[:4]))
    make_finet2i_tar(subset / "train-000001.tar", finet2i_records(PHOTOS[4:], first_id=4))
    return subset


# --------------------------------------------------------------------------- fine-t2i


@pytest.mark.parametrize("pattern", ["train-{000000..000001}.tar", "train-*.tar", ""])
def test_finet2i_lists_one_unit_per_tar_from_ranges_globs_and_prefixes(finet2i_dir, pattern):
    source = build_source(FineT2IConfig(uris=[f"{finet2i_dir}/{pattern}"]))

    units = source.list_units()

    assert [unit.name for unit in units] == ["synthetic_x__train-000000", "synthetic_x__train-000001"]
    assert [unit.uri for unit in units] == [
        str(finet2i_dir / "train-000000.tar"),
        str(finet2i_dir / "train-000001.tar"),
    ]


def test_finet2i_uri_that_names_nothing_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="nothing-here"):
        build_source(FineT2IConfig(uris=[f"{tmp_path}/nothing-here-*.tar"])).list_units()


@pytest.mark.parametrize(
    ("caption_field", "expected"),
    [("enhanced_prompt", "enhanced_prompt"), ("prompt", "prompt"), ("txt", "caption")],
)
def test_finet2i_caption_field_picks_the_json_prompt_or_the_txt(finet2i_dir, caption_field, expected):
    samples = all_samples(build_source(FineT2IConfig(uris=[str(finet2i_dir)], caption_field=caption_field)))

    assert [s.caption for s in samples] == [getattr(photo, expected) for photo in PHOTOS]
    assert all(s.meta["caption_field"] == caption_field for s in samples)


def test_finet2i_samples_carry_key_image_and_metadata(finet2i_dir):
    first = all_samples(build_source(FineT2IConfig(uris=[str(finet2i_dir)])))[0]

    assert first.key == "ft2i-000000" and first.failure is None
    assert first.image_bytes[:2] == b"\xff\xd8"  # a JPEG
    assert first.meta["id"] == "ft2i-000000"
    assert first.meta["aesthetic_score"] == 4.0
    assert first.meta["image_resolution"] == [512, 512]
    assert first.meta["shard"].endswith("train-000000.tar")


def test_finet2i_mix_picks_the_same_caption_per_key_on_every_run(finet2i_dir):
    config = FineT2IConfig(uris=[str(finet2i_dir)], caption_field="mix")

    first = [(s.key, s.caption) for s in all_samples(build_source(config))]
    second = [(s.key, s.caption) for s in all_samples(build_source(config))]

    assert first == second


def test_finet2i_mix_follows_its_weights_over_many_keys():
    weights = {"enhanced_prompt": 2.0, "prompt": 1.0, "txt": 1.0}
    picks = Counter(mixed_caption_field(f"k{i}", list(weights), weights, seed=0) for i in range(4000))

    assert abs(picks["enhanced_prompt"] / 4000 - 0.5) < 0.03
    assert abs(picks["prompt"] / 4000 - 0.25) < 0.03
    assert abs(picks["txt"] / 4000 - 0.25) < 0.03


def test_finet2i_mix_seed_changes_the_picks():
    weights = {"enhanced_prompt": 1.0, "prompt": 1.0, "txt": 1.0}
    keys = [f"k{i}" for i in range(50)]

    def picks(seed):
        return [mixed_caption_field(key, list(weights), weights, seed) for key in keys]

    assert picks(0) == picks(0)
    assert picks(0) != picks(1)


def test_finet2i_mix_skips_fields_a_sample_lacks():
    weights = {"enhanced_prompt": 1.0, "prompt": 1.0, "txt": 1.0}

    assert {mixed_caption_field(f"k{i}", ["txt"], weights, seed=0) for i in range(20)} == {"txt"}


def test_finet2i_streams_tars_from_s3_listed_by_glob(tmp_path, s3_server):
    make_finet2i_tar(tmp_path / "train-000000.tar", finet2i_records(PHOTOS[:2]))
    make_finet2i_tar(tmp_path / "train-000001.tar", finet2i_records(PHOTOS[2:3], first_id=2))
    prefix = s3_server.uri("sources", "synthetic_x")
    for name in ("train-000000.tar", "train-000001.tar"):
        storage.upload_file(tmp_path / name, storage.join(prefix, name))

    source = build_source(FineT2IConfig(uris=[f"{prefix}/train-*.tar"], caption_field="txt"))

    assert [unit.uri for unit in source.list_units()] == [
        f"{prefix}/train-000000.tar",
        f"{prefix}/train-000001.tar",
    ]
    assert [s.caption for s in all_samples(source)] == [photo.caption for photo in PHOTOS[:3]]


# --------------------------------------------------------------------------- LAION


def laion_config(path, **changes) -> LaionConfig:
    return LaionConfig(uris=[str(path)], **{**LAION_FETCH_SETTINGS, **changes})


def test_laion_units_are_row_groups_with_their_first_row(tmp_path):
    rows = [{"URL": f"http://127.0.0.1:9/{i}.jpg", "TEXT": f"caption {i}"} for i in range(10)]
    path = make_laion_parquet(tmp_path / "laion" / "part-00003.parquet", rows, row_group_size=4)

    units = build_source(laion_config(path)).list_units()

    assert [unit.name for unit in units] == [
        "laion__part-00003__rg0000",
        "laion__part-00003__rg0001",
        "laion__part-00003__rg0002",
    ]
    assert [(u.options["row_group"], u.options["first_row"], u.options["num_rows"]) for u in units] == [
        (0, 0, 4),
        (1, 4, 4),
        (2, 8, 2),
    ]


def test_laion_fetch_failures_are_counted_by_reason(tmp_path, image_server):
    rows, expected = laion_rows(image_server)
    path = make_laion_parquet(tmp_path / "laion" / "part-00000.parquet", rows, row_group_size=4)

    reasons = reasons_by_key(build_source(laion_config(path)), PREPROCESS)

    assert list(reasons) == [f"laion__part-00000-{row}" for row in range(len(rows))]
    assert list(reasons.values()) == expected
    assert Counter(reasons.values()) == {
        None: 4,
        "http_404": 1,
        "http_403": 1,
        "timeout": 1,
        "truncated_body": 1,
        "decode_error": 1,
        "too_large": 1,
        "missing_caption": 1,
    }


def test_laion_samples_keep_row_order_when_an_early_fetch_is_slowest(tmp_path, image_server):
    urls = [image_server.url("slow/coffee.jpg")] + [
        image_server.url(f"image/{p.name}.jpg") for p in PHOTOS[:5]
    ]
    path = make_laion_parquet(tmp_path / "p.parquet", [{"URL": url, "TEXT": "a photo"} for url in urls])

    samples = all_samples(build_source(laion_config(path)))

    assert [s.meta["row"] for s in samples] == list(range(6))
    assert [s.meta["url"] for s in samples] == urls
    assert samples[0].failure == "timeout" and all(s.failure is None for s in samples[1:])


def test_laion_retries_a_503_and_then_gets_the_image(tmp_path, image_server):
    url = image_server.flaky_url("china")
    path = make_laion_parquet(tmp_path / "p.parquet", [{"URL": url, "TEXT": "a temple"}])

    [sample] = all_samples(build_source(laion_config(path)))

    assert sample.failure is None and sample.image_bytes[:2] == b"\xff\xd8"
    assert image_server.hits[url.removeprefix(image_server.base_url)] == 2


def test_laion_does_not_retry_a_404(tmp_path, image_server):
    path = make_laion_parquet(
        tmp_path / "p.parquet", [{"URL": image_server.url("status/404?once"), "TEXT": "x"}]
    )

    [sample] = all_samples(build_source(laion_config(path, retries=3)))

    assert sample.failure == "http_404"
    assert image_server.hits["/status/404?once"] == 1


def test_laion_uses_the_key_column_and_copies_meta_columns(tmp_path, image_server):
    rows = [
        {"URL": image_server.url("image/rocket.jpg"), "TEXT": "a rocket", "key": "000123", "similarity": 0.31}
    ]
    path = make_laion_parquet(tmp_path / "p.parquet", rows)

    [sample] = all_samples(build_source(laion_config(path)))

    assert sample.key == "000123"
    assert sample.meta["similarity"] == pytest.approx(0.31)
    assert sample.caption == "a rocket"


def test_laion_missing_url_column_names_the_file_and_the_column(tmp_path):
    path = make_laion_parquet(tmp_path / "p.parquet", [{"url": "http://127.0.0.1:9/a.jpg", "TEXT": "a"}])
    source = build_source(laion_config(path))

    with pytest.raises(ValueError, match=r"p\.parquet has no column 'URL'"):
        all_samples(source)


# --------------------------------------------------------------------------- folders


def test_folder_pairs_images_with_same_stem_captions_and_json(tmp_path):
    expected = write_photo_folder(tmp_path / "photos")

    samples = all_samples(build_source(FolderConfig(root=str(tmp_path / "photos"))))

    assert {s.key: s.caption for s in samples} == expected
    assert [s.key for s in samples] == sorted(expected)
    assert next(s for s in samples if s.key == "astronaut").meta["source_meta"] == {"photographer": "NASA"}


def test_folder_units_are_sorted_chunks_of_files(tmp_path):
    write_photo_folder(tmp_path / "photos")

    units = build_source(FolderConfig(root=str(tmp_path / "photos"), files_per_unit=3)).list_units()

    assert [unit.name for unit in units] == [
        "photos__chunk-00000",
        "photos__chunk-00001",
        "photos__chunk-00002",
    ]
    assert [len(unit.options["items"]) for unit in units] == [3, 3, 1]


def test_folder_refuses_two_images_sharing_one_caption_stem(tmp_path):
    write_photo_folder(tmp_path, PHOTOS[:1])
    (tmp_path / "astronaut.png").write_bytes(b"")

    with pytest.raises(ValueError, match="astronaut.png"):
        build_source(FolderConfig(root=str(tmp_path))).list_units()


def test_classfolder_captions_come_from_the_template_and_label_names(tmp_path):
    expected = make_class_folder_corpus(tmp_path)
    config = ClassFolderConfig(root=str(tmp_path), label_names={"still_life": "still life"})

    source = build_source(config)
    samples = all_samples(source)

    assert [unit.name for unit in source.list_units()] == ["cat", "space", "still_life"]
    assert {s.key: s.meta["label"] for s in samples} == expected
    assert {s.caption for s in samples} == {
        "a photo of a cat",
        "a photo of a space",
        "a photo of a still life",
    }
    assert {s.meta["label"]: s.meta["class_index"] for s in samples} == {
        "cat": 0,
        "space": 1,
        "still_life": 2,
    }


def test_classfolder_splits_big_classes_into_chunks(tmp_path):
    make_class_folder_corpus(tmp_path)

    units = build_source(ClassFolderConfig(root=str(tmp_path), files_per_unit=1)).list_units()

    assert [unit.name for unit in units] == [
        "cat__chunk-00000",
        "space__chunk-00000",
        "space__chunk-00001",
        "still_life__chunk-00000",
        "still_life__chunk-00001",
    ]


@pytest.mark.parametrize("template", ["a photo", "a photo of {name}", "{0}"])
def test_classfolder_template_must_use_exactly_the_label_field(template):
    with pytest.raises(ValidationError, match="caption_template"):
        ClassFolderConfig(root="/data", caption_template=template)


# --------------------------------------------------------------------------- configs and unit selection


def test_source_config_is_chosen_by_kind():
    adapter = TypeAdapter(SourceConfig)

    assert isinstance(adapter.validate_python({"kind": "laion", "uris": ["a.parquet"]}), LaionConfig)
    assert isinstance(adapter.validate_python({"kind": "folder", "root": "/data"}), FolderConfig)
    with pytest.raises(ValidationError, match="finet2i"):
        adapter.validate_python({"kind": "tfrecord", "uris": ["a"]})


def test_finet2i_mix_weights_must_be_non_negative_odds():
    with pytest.raises(ValidationError, match="mix_weights"):
        FineT2IConfig(uris=["a.tar"], caption_field="mix", mix_weights={"prompt": -1.0, "txt": 0.5})


UNITS = [InputUnit(f"subset__train-{i:06d}", "finet2i", f"/d/train-{i:06d}.tar") for i in range(10)]


def test_select_units_filters_by_name_then_strides_then_caps():
    selected = select_units(
        UNITS, include=["subset__train-00000*"], shard_index=1, num_shards=3, limit_units=2
    )

    assert [unit.name for unit in selected] == ["subset__train-000001", "subset__train-000004"]


def test_select_units_shards_cover_every_unit_once():
    shards = [select_units(UNITS, shard_index=index, num_shards=3) for index in range(3)]

    assert sorted(unit.name for shard in shards for unit in shard) == [unit.name for unit in UNITS]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"include": ["typo*"]}, "typo"),
        ({"shard_index": 3, "num_shards": 3}, "shard_index"),
        ({"limit_units": -1}, "limit_units"),
    ],
)
def test_select_units_rejects_bad_selections(arguments, message):
    with pytest.raises(ValueError, match=message):
        select_units(UNITS, **arguments)
