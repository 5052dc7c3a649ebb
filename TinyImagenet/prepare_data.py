"""Download tiny-imagenet-200 (needs internet) and regroup its validation images into one
folder per class, the layout ImageFolder and locallip/data.py expect:

    python TinyImagenet/prepare_data.py --data_dir data          # download + regroup
    python TinyImagenet/prepare_data.py --data_dir data --no_download   # regroup only
"""
import argparse
import os
import shutil
import sys
import urllib.request
import zipfile

URL = 'http://cs231n.stanford.edu/tiny-imagenet-200.zip'


def regroup_val(root):
    """root/val/images/*.JPEG + root/val/val_annotations.txt -> root/val/<wnid>/*.JPEG.
    Returns the number of images moved (0 when already regrouped)."""
    val = os.path.join(root, 'val')
    ann = os.path.join(val, 'val_annotations.txt')
    images = os.path.join(val, 'images')
    if not os.path.isdir(images):
        return 0
    moved = 0
    with open(ann) as f:
        for line in f:
            parts = line.strip().split('\t')
            if len(parts) < 2:
                continue
            name, wnid = parts[0], parts[1]
            os.makedirs(os.path.join(val, wnid), exist_ok=True)
            src = os.path.join(images, name)
            if os.path.exists(src):
                os.replace(src, os.path.join(val, wnid, name))
                moved += 1
    if not os.listdir(images):
        os.rmdir(images)
    return moved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data_dir', default='data', help="where tiny-imagenet-200/ goes")
    p.add_argument('--no_download', action='store_true', help="only regroup an existing copy")
    a = p.parse_args(argv)
    root = os.path.join(a.data_dir, 'tiny-imagenet-200')
    if not os.path.isdir(root):
        if a.no_download:
            sys.exit(f"error: no {root}; run without --no_download on a machine with internet")
        os.makedirs(a.data_dir, exist_ok=True)
        zpath = os.path.join(a.data_dir, 'tiny-imagenet-200.zip')
        print(f"downloading {URL} (about 240 MB) ...", flush=True)
        try:
            with urllib.request.urlopen(URL) as r, open(zpath + '.part', 'wb') as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            sys.exit(f"error: download of {URL} failed: {e}")
        os.replace(zpath + '.part', zpath)
        with zipfile.ZipFile(zpath) as z:
            z.extractall(a.data_dir)
    n = regroup_val(root)
    print(f"{root}: {n} validation images regrouped into class folders")


if __name__ == '__main__':
    main()
