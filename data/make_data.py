"""Generate the tiny bundled "day -> night" dataset in data/ (deterministic, no downloads).

Each scene is a background plus 2-5 shapes (ellipses, rotated rectangles, triangles)
with soft shading. One scene can be rendered in two domains:

  A "day":   pale sky-to-sand vertical gradient, shapes in flat saturated WARM colours.
  B "night": the SAME layout on a dark navy gradient, shapes filled with diagonal
             zebra-like stripes of a COOL colour (red->cyan, orange->blue, ...)
             alternating with a dark shade of that colour.

The two domains differ in appearance only, never in geometry (like horse->zebra or
day->night), so an unpaired translator has to change colour/texture while keeping
structure. The global colour change is learnt quickly by a small ResNet generator; the
stripe texture shows up with longer training. trainA and trainB come from different
random scenes and have different sizes (unpaired, |A| != |B|). The test split is paired:
testA/NNNN.png and testB/NNNN.png are the same scene, i.e. ground truth for evaluation.

Usage (from the repo root):  python data/make_data.py
Only numpy and Pillow are used; the output PNGs are byte-identical on every run.
"""
import os
import shutil

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.abspath(__file__))
SIZE, SS = 96, 4                 # output side, supersampling factor (anti-aliasing)
N_TRAIN_A, N_TRAIN_B, N_TEST = 300, 260, 30
# warm day colours and their cool night counterparts (index-aligned)
WARM = np.array([(220, 50, 40), (240, 140, 30), (235, 205, 40), (205, 45, 135), (150, 80, 40)], float)
COOL = np.array([(40, 215, 225), (70, 120, 255), (225, 235, 255), (70, 235, 120), (170, 90, 255)], float)
STRIPE_DARK = 0.4                # dark stripes = 40% of the cool colour (keeps silhouettes)
STRIPE_PERIOD = 8.0              # pixels (at output resolution), 45-degree stripes

# supersampled pixel-centre coordinates in output-pixel units
_c = (np.arange(SIZE * SS) + 0.5) / SS
YY, XX = np.meshgrid(_c, _c, indexing="ij")


def random_scene(rng):
    """A scene = background jitter + list of shapes (pure parameters, no pixels)."""
    shapes = []
    for _ in range(rng.integers(2, 6)):
        shapes.append(dict(
            kind=["ellipse", "rect", "triangle"][rng.integers(3)],
            cx=rng.uniform(14, SIZE - 14), cy=rng.uniform(14, SIZE - 14),
            r=rng.uniform(8, 20),                     # half-extent: 17-42% of the side
            aspect=rng.uniform(0.55, 1.0), angle=rng.uniform(0, np.pi),
            tri=rng.uniform(-0.5, 0.5, 3),            # triangle vertex angle jitter
            color=rng.integers(len(WARM)), jitter=rng.uniform(-12, 12, 3)))
    return dict(tint=rng.uniform(-10, 10, 3), shapes=shapes)


def shape_mask(s):
    """Boolean coverage of one shape on the supersampled grid."""
    dx, dy = XX - s["cx"], YY - s["cy"]
    ca, sa = np.cos(s["angle"]), np.sin(s["angle"])
    u, v = ca * dx + sa * dy, -sa * dx + ca * dy      # shape-local coordinates
    a, b = s["r"], s["r"] * s["aspect"]
    if s["kind"] == "ellipse":
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if s["kind"] == "rect":
        return (np.abs(u) <= a) & (np.abs(v) <= b)
    # triangle: 3 jittered points on a circle, counter-clockwise, never degenerate
    ang = s["angle"] + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + s["tri"]
    px, py = s["cx"] + s["r"] * np.cos(ang), s["cy"] + s["r"] * np.sin(ang)
    inside = np.ones_like(XX, bool)
    for i in range(3):                                # counter-clockwise half-planes
        j = (i + 1) % 3
        inside &= (px[j] - px[i]) * (YY - py[i]) - (py[j] - py[i]) * (XX - px[i]) >= 0
    return inside


def render(scene, domain):
    """Render a scene in domain 'A' (day) or 'B' (night) -> uint8 HxWx3."""
    t = (YY / SIZE)[..., None]                        # 0 at top, 1 at bottom
    if domain == "A":
        top, bottom = np.array([185, 215, 245.]), np.array([240, 225, 185.])
    else:
        top, bottom = np.array([8, 12, 38.]), np.array([30, 25, 60.])
    img = (1 - t) * top + t * bottom + scene["tint"] * (0.5 if domain == "B" else 1.0)
    stripes = (((XX + YY) / STRIPE_PERIOD) % 1.0 < 0.5)[..., None]
    for s in scene["shapes"]:                         # painter's order
        m = shape_mask(s)[..., None]
        # soft shading: lighter towards the top-left of the shape, darker bottom-right
        shade = 1.0 - 0.12 * np.clip(((XX - s["cx"]) + (YY - s["cy"])) / (2 * s["r"]), -1, 1)
        if domain == "A":
            fill = WARM[s["color"]] + s["jitter"]
        else:
            cool = COOL[s["color"]] + s["jitter"]
            fill = np.where(stripes, cool, STRIPE_DARK * cool)
        img = np.where(m, fill * shade[..., None], img)
    img = np.clip(img, 0, 255)
    # box-filter down to SIZE x SIZE (anti-aliasing), round to uint8
    img = img.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


def save(arr, folder, idx):
    # fixed options, no metadata -> byte-identical output
    Image.fromarray(arr, "RGB").save(os.path.join(ROOT, folder, f"{idx:04d}.png"), optimize=True)


def main():
    for folder in ("trainA", "trainB", "testA", "testB"):   # start from a clean slate
        shutil.rmtree(os.path.join(ROOT, folder), ignore_errors=True)
        os.makedirs(os.path.join(ROOT, folder))
    # separate seeded streams: trainA / trainB / test scenes are all different
    rng_a, rng_b, rng_t = (np.random.default_rng(s) for s in (1001, 2002, 3003))
    for i in range(N_TRAIN_A):
        save(render(random_scene(rng_a), "A"), "trainA", i)
    for i in range(N_TRAIN_B):
        save(render(random_scene(rng_b), "B"), "trainB", i)
    for i in range(N_TEST):                           # paired: same scene, both domains
        scene = random_scene(rng_t)
        save(render(scene, "A"), "testA", i)
        save(render(scene, "B"), "testB", i)
    total = 0
    for folder in ("trainA", "trainB", "testA", "testB"):
        files = os.listdir(os.path.join(ROOT, folder))
        nbytes = sum(os.path.getsize(os.path.join(ROOT, folder, f)) for f in files)
        total += nbytes
        print(f"{folder:7s} {len(files):4d} images {nbytes / 1024:8.1f} KiB")
    print(f"total   {total / 1024:.1f} KiB ({SIZE}x{SIZE} RGB PNG)")


if __name__ == "__main__":
    main()
