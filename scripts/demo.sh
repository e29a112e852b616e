#!/usr/bin/env bash
# `make demo`: build the sample rasters and the tiny model, then ground an expression over a sample
# raster through a real engine process and write a GeoPackage.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo-out}
GEO=.venv/bin/geo-r1
export HF_HUB_OFFLINE=1

mkdir -p "$OUT"
echo "[demo] 1/3 sample rasters -> $OUT/samples"
$GEO sample-data "$OUT/samples"
if [[ -f "$OUT/tiny-model/model.safetensors" ]]; then
  echo "[demo] 2/3 tiny Qwen2.5-VL model: reusing $OUT/tiny-model (delete it to rebuild)"
else
  echo "[demo] 2/3 tiny Qwen2.5-VL model -> $OUT/tiny-model (random weights, then 300 steps on the answer format)"
  $GEO tiny-model "$OUT/tiny-model" --learn-format 300
fi
echo "[demo] 3/3 grounding 'all storage tanks' over $OUT/samples/utm.tif (starts a local engine)"
rm -f "$OUT/demo.gpkg"
$GEO ground "$OUT/samples/utm.tif" "all storage tanks" -o "$OUT/demo.gpkg" --mode all \
  --model "$OUT/tiny-model" --tile 448 --overlap 64 --max-new-tokens 96
cat <<MSG

[demo] done. The GeoPackage is $(realpath "$OUT/demo.gpkg")
[demo] Open it in QGIS: Layer > Add Layer > Add Vector Layer..., or drag the file onto the map, and pick
[demo]   the layer named after the expression (the *_tiles_raw layer holds per-tile boxes before merging),
[demo]   together with $(realpath "$OUT/samples/utm.tif") (the raster it was grounded on).
[demo] Each polygon carries the model's reasoning, its score and presence, and the run's details.
[demo] NOTE: the bundled tiny model is randomly initialised (then taught only the answer FORMAT),
[demo] so its boxes mean nothing. For real results use real weights, e.g.:
[demo]   $GEO ground RASTER "the largest storage tank" -o out.gpkg --mode one \\
[demo]     --model Geo-R1/Geo-R1-3B-GRPO-REC-10shot --processor Qwen/Qwen2.5-VL-3B-Instruct
[demo] (or --model /path/to/a/local/checkpoint).
MSG
