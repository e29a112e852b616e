#!/usr/bin/env bash
# `make demo`: build the sample rasters, then ground "all storage tanks" over one of them with the project's
# sample model (resources/sample_model) through a real engine process, write a GeoPackage, and count the true
# tanks it found.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo-out}
GEO=.venv/bin/geo-r1
MODEL=resources/sample_model
SEED=9100  # a scene the sample model never saw: it was trained on seeds 0-199 (held-out checks use 9000+)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

mkdir -p "$OUT"
echo "[demo] 1/3 sample rasters (scene seed $SEED) -> $OUT/samples"
$GEO sample-data "$OUT/samples" --seed "$SEED"
echo "[demo] 2/3 grounding 'all storage tanks' over $OUT/samples/utm.tif with the sample model (starts a local engine)"
rm -f "$OUT/demo.gpkg"
$GEO ground "$OUT/samples/utm.tif" "all storage tanks" -o "$OUT/demo.gpkg" --mode all \
  --model "$MODEL" --overlap 64 --max-new-tokens 384  # the tile: the 224 px the model serves (its manifest)
echo "[demo] 3/3 the detections against the scene's truth ($OUT/samples/utm.objects.geojson)"
$GEO match "$OUT/demo.gpkg" "$OUT/samples/utm.objects.geojson" --category tank
cat <<MSG

[demo] done. The GeoPackage is $(realpath "$OUT/demo.gpkg")
[demo] Open it in QGIS: Layer > Add Layer > Add Vector Layer..., or drag the file onto the map, and pick
[demo]   the layer named after the expression (the *_tiles_raw layer holds per-tile boxes before merging),
[demo]   together with $(realpath "$OUT/samples/utm.tif") (the raster it was grounded on).
[demo] Each polygon carries the model's reasoning, its score and presence, and the run's details.
[demo] The sample model is a 0.3 M-parameter Qwen2.5-VL the project trained on its own synthetic scenes
[demo] (resources/sample_model/geo_r1_sample_model.json): it knows storage tanks on such scenes and nothing
[demo] else. For real imagery use Geo-R1's weights, e.g.:
[demo]   $GEO ground RASTER "the largest storage tank" -o out.gpkg --mode one \\
[demo]     --model Geo-R1/Geo-R1-3B-GRPO-REC-10shot --processor Qwen/Qwen2.5-VL-3B-Instruct
[demo] (or --model /path/to/a/local/checkpoint).
MSG
