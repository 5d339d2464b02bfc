"""Generate a DocMNIST dataset (docs/method.md section 2).

    python3 docmnist/generate_docmnist.py --attribute_budget=30000 --target_sample_complexity=16

Options: --seed (23), --val_attribute_budget (10000), --test_attribute_budget (10000), --data_root
(${PROJECT_DIR}/data), --overwrite, --no_progress. The dataset folder is printed on the last line.
"""

from villa.docmnist.generate import cli_main

if __name__ == "__main__":
    cli_main()
