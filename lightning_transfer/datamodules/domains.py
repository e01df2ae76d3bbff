"""Domain-shift benchmarks laid out as ``<root>/<domain>/<class>/<image>``: Office-31, Office-Home, DomainNet, PACS.

Train on one or more source domains, validate on held-out source images, test on a target domain. The domain is
chosen by name; folder names are matched ignoring case, spaces and dashes (Office-Home ships ``Real World``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_transfer.datamodules.files import FileListDataModule, Sample, image_files, read_split_list
from lightning_transfer.registry import register_datamodule


def _key(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


class DomainFolder(FileListDataModule):
    """Base of the ``<root>/<domain>/<class>/<image>`` benchmarks.

    ``source`` (one domain, or several for domain generalisation) gives the training images; ``val_fraction`` of
    every source class (fixed seed 0) is held out for validation. ``target`` gives the test set (all its images);
    without a target the held-out source images are the test set. Classes are the class folders of the first
    source domain, sorted; every chosen domain must have the same ones. A subclass sets :attr:`domains`,
    :attr:`expected_classes`, :attr:`folder` (the default folder under ``data_dir``) and :attr:`download_hint`.

    Args:
        source: source domain name, or a list of names.
        target: target domain name; ``None`` tests on held-out source images.
        root: the dataset folder (holding one folder per domain); default ``<data_dir>/<folder>``.
        **kwargs: see :class:`~lightning_transfer.datamodules.files.FileListDataModule` (augment, cache_images,
            val_fraction: the share of each source class held out; batch_size, num_shots, seed, ...).
    """

    domains: tuple[str, ...] = ()
    expected_classes: int | None = None
    folder: str = ""
    download_hint: str = ""

    def __init__(
        self,
        source: str | list[str],
        target: str | None = None,
        root: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        names = [source] if isinstance(source, str) else list(source)
        if not names:
            raise ValueError(f"{type(self).__name__}: give at least one source domain ({', '.join(self.domains)})")
        self.sources = [self._domain(n) for n in names]
        self.target = self._domain(target) if target is not None else None
        if len(set(self.sources)) != len(self.sources):
            raise ValueError(f"{type(self).__name__}: source domains {names} repeat a domain")
        if self.target in self.sources:
            raise ValueError(f"{type(self).__name__}: target {target!r} is also a source domain; leave target unset "
                             "to test on held-out source images")
        self.root = Path(root).expanduser() if root else self.data_dir / self.folder
        self.variant = f"{'+'.join(self.sources)}->{self.target or 'held-out'}"
        self._class_names: list[str] | None = None

    def _domain(self, name: str) -> str:
        known = {_key(d): d for d in self.domains}
        if _key(name) not in known:
            raise ValueError(f"{type(self).__name__} has no domain {name!r}; its domains are: "
                             f"{', '.join(self.domains)}")
        return known[_key(name)]

    def domains_root(self) -> Path:
        """The folder holding the domain folders."""
        return self.root

    def domain_dir(self, domain: str) -> Path:
        """The folder of ``domain``'s class folders (the ``<domain>/images/`` level of Office-31 is skipped)."""
        parent = self.domains_root()
        found = [p for p in parent.iterdir() if p.is_dir() and _key(p.name) == _key(domain)] if parent.is_dir() else []
        if not found:
            raise FileNotFoundError(
                f"{type(self).__name__}: domain {domain!r} not found under {parent} (looked for a folder named "
                f"{domain!r}, any case). {self.download_hint} Lay it out as <root>/<domain>/<class>/<image> and set "
                "data.init_args.root (default <data_dir>/" + self.folder + ")"
            )
        return found[0] / "images" if (found[0] / "images").is_dir() else found[0]

    def _classes_of(self, domain: str) -> list[str]:
        return sorted(p.name for p in self.domain_dir(domain).iterdir() if p.is_dir())

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            names = self._classes_of(self.sources[0])
            if self.expected_classes is not None and len(names) != self.expected_classes:
                raise ValueError(f"{type(self).__name__}: {self.domain_dir(self.sources[0])} has {len(names)} class "
                                 f"folders, expected {self.expected_classes}; the download looks incomplete")
            for domain in [*self.sources[1:], *([self.target] if self.target else [])]:
                if self._classes_of(domain) != names:
                    raise ValueError(f"{type(self).__name__}: the class folders of {domain!r} differ from those of "
                                     f"{self.sources[0]!r}; every domain needs the same classes")
            self._class_names = names
        return list(self._class_names)

    def domain_samples(self, domain: str) -> list[Sample]:
        """Every image of ``domain`` with its class index."""
        index = {name: i for i, name in enumerate(self.class_names)}
        folder = self.domain_dir(domain)
        samples = [(str(p), index[p.relative_to(folder).parts[0]]) for p in image_files(folder)
                   if len(p.relative_to(folder).parts) > 1]
        if not samples:
            raise FileNotFoundError(f"{type(self).__name__}: no images under {folder}")
        return samples

    def load_samples(self) -> dict[str, list[Sample]]:
        train = [s for d in self.sources for s in self.domain_samples(d)]
        return {"train": train, "test": self.domain_samples(self.target)} if self.target else {"train": train}


@register_datamodule("office31")
class Office31(DomainFolder):
    """Office-31 (Saenko et al., ECCV 2010): 31 office objects in the amazon, dslr and webcam domains."""

    domains = ("amazon", "dslr", "webcam")
    expected_classes, folder = 31, "office31"
    download_hint = "Download Office-31 (domain_adaptation_images.tar.gz, linked from the Office-31 page)."


@register_datamodule("office_home")
class OfficeHome(DomainFolder):
    """Office-Home (Venkateswara et al., CVPR 2017, arXiv 1706.07522): 65 classes in 4 domains."""

    domains = ("Art", "Clipart", "Product", "Real_World")
    expected_classes, folder = 65, "office_home"
    download_hint = "Download OfficeHomeDataset_10072016 from hemanthdv.github.io/officehome-dataset."


@register_datamodule("pacs")
class PACS(DomainFolder):
    """PACS (Li et al., ICCV 2017, arXiv 1710.03077): 7 classes in photo, art painting, cartoon and sketch."""

    domains = ("art_painting", "cartoon", "photo", "sketch")
    expected_classes, folder = 7, "pacs"
    download_hint = "Download PACS (the kfold/ image folders) from the PACS page, e.g. via the DomainBed scripts."

    def domains_root(self) -> Path:
        return self.root / "kfold" if (self.root / "kfold").is_dir() else self.root  # the release nests kfold/


@register_datamodule("domainnet")
class DomainNet(DomainFolder):
    """DomainNet (Peng et al., ICCV 2019, arXiv 1812.01754): 345 classes in 6 domains, with official splits.

    Where ``<root>/<domain>_train.txt`` and ``<domain>_test.txt`` exist (``<domain>/<class>/<image> <label>`` per
    line) the official splits are used: training images from the sources' train lists (validation held out from
    them) and the target's (or, without a target, the sources') test list. Otherwise every image of a domain is used.
    """

    domains = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
    expected_classes, folder = 345, "domainnet"
    download_hint = "Download the cleaned DomainNet zips and split files from ai.bu.edu/M3SDA."

    def _official(self, domain: str, split: str) -> Path:
        return self.root / f"{domain}_{split}.txt"

    def load_samples(self) -> dict[str, list[Sample]]:
        domains = [*self.sources, *([self.target] if self.target else [])]
        if not all(self._official(d, s).is_file() for d in domains for s in ("train", "test")):
            return super().load_samples()
        self.variant = f"{'+'.join(self.sources)}->{self.target or 'source-test'}/official"
        tests = [self.target] if self.target else self.sources
        self.listed_in = ", ".join(str(self._official(d, s)) for d, s in
                                   [*((d, "train") for d in self.sources), *((d, "test") for d in tests)])
        splits = {"train": [s for d in self.sources for s in read_split_list(self._official(d, "train"), self.root)],
                  "test": [s for d in tests for s in read_split_list(self._official(d, "test"), self.root)]}
        names = self.class_names
        for path, label in (s for samples in splits.values() for s in samples):
            if 0 <= label < len(names) and Path(path).parent.name != names[label]:  # out-of-range: the base's check
                raise ValueError(f"DomainNet split lists give {path!r} label {label} ({names[label]!r}), but it "
                                 f"lies in the class folder {Path(path).parent.name!r}; the list and folders disagree")
        return splits
