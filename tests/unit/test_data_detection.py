"""The boxes follow their pixels through the training augmentations: each box, after a random
crop and flip, is exactly the extent of the pixels it held; a box cropped away is dropped."""

from __future__ import annotations

import torch

from karpathy_runner.data.detection import augment_boxes


def test_boxes_follow_crops_and_flips_of_their_pixels():
    size, padding = 16, 5
    images = torch.zeros(32, 3, size, size, dtype=torch.uint8)
    boxes = torch.zeros(32, 2, 4)
    labels = torch.zeros(32, 2, dtype=torch.int64)
    for index in range(32):  # one lit box per image, its corners in (continuous) pixels
        x0, y0 = index % 9, (index * 5) % 9
        images[index, :, y0:y0 + 6, x0:x0 + 5] = 255
        boxes[index, 0] = torch.tensor([x0, y0, x0 + 5, y0 + 6], dtype=torch.float32)
        labels[index, 0] = 2
    generator = torch.Generator().manual_seed(0)
    moved, moved_boxes, moved_labels = augment_boxes(images, boxes, labels, ("crop", "flip"), padding,
                                                     generator)
    for image, image_boxes, image_labels in zip(moved, moved_boxes, moved_labels, strict=True):
        lit = image[0].nonzero()
        if len(lit) == 0:  # cropped away entirely: no box left
            assert image_labels.tolist() == [0, 0]
            continue
        rows, cols = lit[:, 0], lit[:, 1]
        extent = [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]
        assert image_labels.tolist() == [2, 0] and image_boxes[0].tolist() == extent
