# Every target depends on `install`, which builds .venv from a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to a pair that works together; override for another platform,
# e.g. `make install TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export WANDB_SILENT ?= true

.PHONY: install demo test test-all lint bench bench-vitb clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) scripts/bench_digits.py

bench-vitb: install
	$(PY) -m lightning_transfer bench --config configs/experiment/bench_vit_b16_shaped.yaml --seeds 1 --omit-accuracy \
		--strategies full,linear_probe,partial_freeze,bitfit,norm_tuning,lora,peft_method,adapter,vqt,sherl \
		--output runs/bench_vit_b16_shaped --no-wandb

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m 'not gpu'

lint: install
	$(VENV)/bin/ruff check lightning_transfer tests scripts
	$(VENV)/bin/mypy lightning_transfer

clean:
	rm -rf $(VENV) runs wandb lightning_logs
