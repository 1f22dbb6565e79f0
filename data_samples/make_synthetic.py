"""Regenerate the synthetic set (the generator lives in `mmlib.synthetic`).

    python data_samples/make_synthetic.py --out data_samples/synthetic --n 600 --seed 0
"""

from mmlib.synthetic import main

if __name__ == "__main__":
    main()
