# stage_dataset SRC DST: copy the converted dataset SRC to the node-local DST with rsync. Only a
# directory this function made (its .hpc-staging marker names SRC) or an empty one is mirrored with
# --delete; anything else is refused, so a wrong --stage-to can never wipe a user's files. An empty
# or root SRC, or one without manifest.json, is refused too (`hpc sbatch` already checked when it
# rendered this script; this runs again on every node, at run time).
stage_dataset() {
    local src=$1 dst=$2 want marker
    if [[ -z "$src" || "$(realpath -m -- "$src")" == / || ! -f "$src/manifest.json" ]]; then
        echo "staging: refusing source '$src' (empty, / or not a converted dataset)" >&2
        return 2
    fi
    if [[ -z "$dst" || "$(realpath -m -- "$dst")" == / ]]; then
        echo "staging: refusing target '$dst'" >&2
        return 2
    fi
    want="hpc staging of $(realpath -- "$src")"
    marker="$dst/.hpc-staging"
    mkdir -p -- "$dst" || return 2
    if [[ -f "$marker" && "$(cat -- "$marker")" == "$want" ]]; then
        :  # our own earlier copy of this dataset: an incremental mirror
    elif [[ -z "$(ls -A -- "$dst")" ]]; then
        printf '%s\n' "$want" > "$marker" || return 2
    else
        echo "staging: $dst is not empty and not a staging of $src (no matching $marker); refusing" >&2
        return 2
    fi
    rsync -a --delete --exclude=/.hpc-staging -- "$src/" "$dst/"
}
