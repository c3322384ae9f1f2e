#!/bin/sh
# Fill a wheelhouse on the host, for image builds whose containers cannot reach a package index:
#   sh docker/wheelhouse.sh DIR [TORCH_INDEX] [EXTRAS]        (from the repository root)
# The wheels are for the image's interpreter (Debian bookworm: CPython 3.11, glibc 2.36, x86_64),
# whatever the host runs. PyTorch and torchvision come from TORCH_INDEX when it answers (PyTorch's CPU
# index keeps the CPU image small); otherwise from the ordinary index, which holds the CUDA build.
set -eu
DIR=$1
TORCH_INDEX=${2:-}
EXTRAS=${3:-}
PIP=${PIP:-pip}

set -- --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --platform manylinux2014_x86_64
for minor in $(seq 36 -1 5); do
    set -- "$@" --platform "manylinux_2_${minor}_x86_64"
done

mkdir -p "$DIR"
WORK=$(mktemp -d /tmp/camserve-wheels.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
sh docker/pip-install.sh requirements "$EXTRAS" > "$WORK/requirements.txt"
: > "$WORK/pins.txt"

if [ -n "$TORCH_INDEX" ]; then
    grep -E '^torch(vision)?([^a-z_-]|$)' "$WORK/requirements.txt" > "$WORK/torch.txt"
    # That index alone: no configured find-links or extra index may slip another build in.
    if env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
        "$PIP" download --quiet -d "$WORK/torch" "$@" --index-url "$TORCH_INDEX" --timeout 20 --retries 1 \
        -r "$WORK/torch.txt"; then
        # Pin the pair just fetched, so the second pass cannot prefer a newer default build.
        for wheel in "$WORK"/torch/torch-*.whl "$WORK"/torch/torchvision-*.whl; do
            name=$(basename "$wheel" | cut -d- -f1)
            version=$(basename "$wheel" | cut -d- -f2)
            echo "$name==$version" >> "$WORK/pins.txt"
        done
        cp "$WORK"/torch/*.whl "$DIR"/
    else
        echo "wheelhouse.sh: $TORCH_INDEX did not answer; torch and torchvision come from the default index" \
             "(on x86_64 Linux that is the CUDA build, several GB larger)" >&2
    fi
fi

"$PIP" download --quiet -d "$DIR" "$@" --find-links "$DIR" -c "$WORK/pins.txt" -r "$WORK/requirements.txt"
echo "wheelhouse $DIR: $(find "$DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1);" \
     "$(cd "$DIR" && ls torch-*.whl torchvision-*.whl | tr '\n' ' ')"
